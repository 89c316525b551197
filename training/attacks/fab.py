"""FAB (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
attack"), l_inf, targeted (FAB-T, the variant in AutoAttack's standard ensemble).

FAB looks for the *smallest* perturbation that crosses the decision boundary towards a target class. Each step
linearises the boundary between the true class y and the target t at the current point x_i (value
g = z_t - z_y, gradient w), projects both x_i and the original image x onto that hyperplane (inside the box
[0, 1], minimal l_inf move), and steps to a convex combination of the two projections, biased towards x so the
result stays close to it (alpha <= alpha_max), with a small overshoot eta. When a step lands on an adversarial
point it is recorded if it is the closest so far, and the iterate is pulled back towards x by beta.

An image counts as broken only if the closest adversarial point found lies within ``eps`` (the budget of the
threat model); otherwise it is returned unchanged. Targets are the ``n_target_classes`` most likely wrong
classes, one run each, only on images not yet broken.
"""
from __future__ import annotations

import torch

from .base import Attack


def project_linf(p: torch.Tensor, w: torch.Tensor, r: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Smallest-l_inf ``d`` (per row) with ``w . d = r`` and ``p + d`` in [0, 1]; where no such ``d`` exists,
    the move of size 1 that gets closest. ``p``, ``w``: (n, D); ``r``: (n,). Solved by bisection on the
    l_inf radius c: the best move of radius c is d_j = clamp(s sign(w_j) c, -p_j, 1 - p_j) (s = sign r), and
    s w . d(c) grows with c."""
    s = torch.sign(r)[:, None]
    direction = s * torch.sign(w)
    lo_b, hi_b = -p, 1 - p

    def move(c):
        return torch.max(torch.min(direction * c[:, None], hi_b), lo_b)

    target = r.abs()
    lo = torch.zeros_like(r)
    hi = torch.ones_like(r)
    for _ in range(iters):
        mid = (lo + hi) / 2
        reached = (s[:, 0] * (w * move(mid)).sum(1)) >= target
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid)
    return move(hi)


class FAB(Attack):
    """``FAB(model, eps=8/255, steps=100, n_target_classes=9, generator=g)(images, labels)``, targeted, l_inf.

    alpha_max 0.1, eta 1.05, beta 0.9 (the paper's l_inf settings). The result stays in the l_inf eps-ball and
    [0, 1]."""

    name = "fab-t"

    def __init__(self, model, eps=8 / 255, steps=100, n_target_classes=9, alpha_max=0.1, eta=1.05, beta=0.9,
                 generator: torch.Generator | None = None, eot_iter: int = 1):
        super().__init__(model, eps, eot_iter)
        if steps < 1:
            raise ValueError(f"need steps >= 1, got {steps}")
        self.steps, self.n_target_classes = steps, n_target_classes
        self.alpha_max, self.eta, self.beta, self.generator = alpha_max, eta, beta, generator

    def _run(self, x, y, t):
        n = x.size(0)
        shape = (n, 1, 1, 1)
        flat = x.flatten(1)
        x_i = x.clone()
        best = x.clone()
        best_norm = torch.full((n,), float("inf"), device=x.device)
        for _ in range(self.steps):
            grad, g, logits = self._grad(x_i, y, lambda z, _y: z.gather(1, t[:, None])[:, 0] - z.gather(1, _y[:, None])[:, 0])
            with torch.no_grad():
                w = grad.flatten(1)
                xi = x_i.flatten(1)
                # hyperplane g + w . (z - x_i) = 0, through the current point and from the original
                d_i = project_linf(xi, w, -g)
                d_o = project_linf(flat, w, -g - (w * (flat - xi)).sum(1))
                ni, no = d_i.abs().amax(1), d_o.abs().amax(1)
                alpha = torch.clamp(ni / (ni + no).clamp_min(1e-12), max=self.alpha_max)[:, None]
                z = ((1 - alpha) * (xi + self.eta * d_i) + alpha * (flat + self.eta * d_o)).clamp(0, 1)
                z = z.view_as(x)
                fooled = self.model(z).float().argmax(1) != y
                norm = (z - x).flatten(1).abs().amax(1)
                better = fooled & (norm < best_norm)
                best = torch.where(better.view(shape), z, best)
                best_norm = torch.where(better, norm, best_norm)
                x_i = torch.where(fooled.view(shape), (1 - self.beta) * x + self.beta * z, z)
        return best, best_norm

    def forward(self, images, labels):
        out = images.clone()
        done = torch.zeros(len(labels), dtype=torch.bool, device=images.device)
        with torch.no_grad():
            logits = self.model(images).float()
            done |= logits.argmax(1) != labels  # already misclassified: nothing to do
            order = logits.sort(dim=1)[1]
        for c in range(min(self.n_target_classes, order.size(1) - 1)):
            todo = ~done
            if not todo.any():
                break
            idx = todo.nonzero()[:, 0]
            adv, norm = self._run(images[idx], labels[idx], order[idx, -(c + 2)])
            ok = norm <= self.eps + 1e-7
            # the point may sit a hair outside the ball through the overshoot: project it back, then recheck
            adv = self._clip(adv, images[idx])
            with torch.no_grad():
                ok &= self.model(adv).float().argmax(1) != labels[idx]
            out[idx[ok]] = adv[ok]
            done[idx[ok]] = True
        return out

    def params(self) -> dict:
        return {**super().params(), "targeted": True, "norm": "linf"}
