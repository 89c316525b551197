"""Square attack (Andriushchenko et al., ECCV 2020), l_inf: score-based black-box random search.

It never uses a gradient, so it cannot be fooled by masked or obfuscated gradients: a Square accuracy well
below the gradient attacks' is the classic sign of gradient masking."""
from __future__ import annotations

import math

import torch

from .base import Attack, margin, uniform

# the step schedule of the paper, over iterations rescaled to 10,000 queries
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    it = int(it / n_queries * 10000)
    div = 512
    for bound, d in _SCHEDULE:
        if it <= bound:
            div = d
            break
    return p_init / div


class Square(Attack):
    """``Square(model, eps=8/255, queries=5000, p_init=0.8, generator=g)(images, labels)``.

    Minimises the margin z_y - max_{i != y} z_i: starts from vertical stripes of +-eps, then each query
    proposes to set one random square window (side shrinking on the schedule) to +-eps per channel, and
    keeps the proposal where the margin drops. Stops per image once it is misclassified."""

    name = "square"

    def __init__(self, model, eps=8 / 255, queries=5000, p_init=0.8, generator: torch.Generator | None = None):
        super().__init__(model, eps)
        self.queries, self.p_init, self.generator = queries, p_init, generator

    def _signs(self, shape, device):
        return 2 * (uniform(shape, self.generator, device) < 0.5).float() - 1

    @torch.no_grad()
    def _margin(self, x, y):
        return margin(self.model(x).float(), y)

    @torch.no_grad()
    def forward(self, images, labels):
        n, c, h, w = images.shape
        x_best = self._clip(images + self.eps * self._signs((n, c, 1, w), images.device), images)
        m_best = self._margin(x_best, labels)
        rows = torch.arange(h, device=images.device)
        cols = torch.arange(w, device=images.device)
        for i in range(self.queries - 1):
            todo = (m_best > 0).nonzero()[:, 0]
            if len(todo) == 0:
                break
            x, xb, y = images[todo], x_best[todo], labels[todo]
            s = int(round(math.sqrt(p_selection(self.p_init, i, self.queries) * h * w)))
            s = min(max(s, 1), h - 1)
            top = (uniform(len(todo), self.generator, images.device) * (h - s + 1)).long().clamp(max=h - s)
            left = (uniform(len(todo), self.generator, images.device) * (w - s + 1)).long().clamp(max=w - s)
            win = ((rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s))[:, None, :, None] \
                & ((cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s))[:, None, None, :]
            delta = torch.where(win, self.eps * self._signs((len(todo), c, 1, 1), images.device), xb - x)
            cand = self._clip(x + delta, x)
            m = self._margin(cand, y)
            better = m < m_best[todo]
            x_best[todo[better]] = cand[better]
            m_best[todo[better]] = m[better]
        return x_best
