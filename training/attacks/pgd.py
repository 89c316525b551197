"""PGD (Madry et al. 2018), l_inf or l_2, random start, restarts keeping the worst case per image."""
from __future__ import annotations

import torch

from .base import Attack, normal, uniform


class PGD(Attack):
    """Projected gradient ascent on cross-entropy: l_inf with signed steps, l_2 with normalised steps.

    ``PGD(model, eps=8/255, alpha=2/255, steps=10, norm="linf", random_start=True, restarts=1, generator=g)``;
    the random start is drawn from ``generator`` (uniform in the l_inf ball; uniform radius in the l_2 ball).
    With ``restarts > 1`` each image keeps the first restart that fools the model."""

    name = "pgd"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", random_start=True,
                 restarts=1, generator: torch.Generator | None = None, eot_iter: int = 1):
        super().__init__(model, eps, eot_iter)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
        self.alpha, self.steps, self.norm, self.random_start, self.restarts = alpha, steps, norm, random_start, restarts
        self.generator = generator

    def _project(self, delta):
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return delta * (self.eps / n).clamp(max=1.0)

    def _start(self, images):
        if not self.random_start:
            return torch.zeros_like(images)
        if self.norm == "linf":
            return (2 * uniform(images.shape, self.generator, images.device) - 1) * self.eps
        d = normal(images.shape, self.generator, images.device)
        r = uniform(images.size(0), self.generator, images.device).view(-1, 1, 1, 1)
        return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * r * self.eps

    def _run(self, images, labels):
        x = (images + self._project(self._start(images))).clamp(0, 1)
        for _ in range(self.steps):
            g, _, _ = self._grad(x, labels)
            if self.norm == "linf":
                step = self.alpha * g.sign()
            else:
                step = self.alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = (images + self._project(x + step - images)).clamp(0, 1)
        return x

    def forward(self, images, labels):
        best = self._run(images, labels)
        if self.restarts > 1:
            with torch.no_grad():
                fooled = self.model(best).argmax(1) != labels
            for _ in range(self.restarts - 1):
                cand = self._run(images, labels)
                with torch.no_grad():
                    now = self.model(cand).argmax(1) != labels
                take = now & ~fooled
                best = torch.where(take.view(-1, 1, 1, 1), cand, best)
                fooled |= now
        return best
