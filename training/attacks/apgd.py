"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), l_inf: step-size-free PGD with momentum and checkpoint-based step halving.

Losses: ``ce`` (APGD-CE), ``dlr`` (APGD-DLR, the difference-of-logits ratio, invariant to logit scale and
shift) and ``dlr-targeted`` (APGD-T: the targeted DLR loss, run once for each of the ``n_target_classes``
most likely wrong classes). ``eot_iter`` averages each gradient over that many passes (AutoAttack's "rand"
version uses 20).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .base import Attack, uniform

LOSSES = ("ce", "dlr", "dlr-targeted")


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): higher is closer to (or past) misclassification."""
    zs, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == labels).float()
    zy = logits.gather(1, labels[:, None])[:, 0]
    return -(zy - zs[:, -2] * top_is_y - zs[:, -1] * (1 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted_loss(logits, labels, targets):
    zs, _ = logits.sort(dim=1)
    zy = logits.gather(1, labels[:, None])[:, 0]
    zt = logits.gather(1, targets[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


class APGD(Attack):
    """``APGD(model, eps=8/255, steps=100, loss="ce", restarts=1, rho=0.75, generator=g)(images, labels)``.

    Images in [0, 1]; the result stays in the l_inf eps-ball and [0, 1]. Per image it returns the first
    point found that the model misclassifies, otherwise the point of highest loss."""

    name = "apgd"

    def __init__(self, model, eps=8 / 255, steps=100, loss="ce", restarts=1, rho=0.75, n_target_classes=9,
                 generator: torch.Generator | None = None, eot_iter: int = 1):
        super().__init__(model, eps, eot_iter)
        if loss not in LOSSES:
            raise ValueError(f"unknown APGD loss {loss!r}; valid: {', '.join(LOSSES)}")
        if steps < 1 or restarts < 1:
            raise ValueError(f"need steps >= 1 and restarts >= 1, got {steps}, {restarts}")
        self.steps, self.loss_name, self.restarts, self.rho = steps, loss, restarts, rho
        self.n_target_classes, self.generator = n_target_classes, generator
        self.name = {"ce": "apgd-ce", "dlr": "apgd-dlr", "dlr-targeted": "apgd-t"}[loss]
        # checkpoint schedule of the paper: p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
        self._k0, self._kmin, self._kdec = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
        self._targets = None

    def loss(self, logits, labels):
        if self.loss_name == "ce":
            return F.cross_entropy(logits, labels, reduction="none")
        if self.loss_name == "dlr":
            return dlr_loss(logits, labels)
        return dlr_targeted_loss(logits, labels, self._targets)

    def _oscillation(self, losses, i, k):
        """1 where the loss increased in fewer than rho * k of the last k steps."""
        inc = torch.zeros_like(losses[0])
        for c in range(k):
            if i - c - 1 >= 0:
                inc += (losses[i - c] > losses[i - c - 1]).float()
        return inc <= k * self.rho

    def _run(self, x, y):
        n = x.size(0)
        shape = (n, 1, 1, 1)
        t = 2 * uniform(x.shape, self.generator, x.device) - 1
        x_adv = (x + self.eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(shape)).clamp(0, 1)
        grad, loss, logits = self._grad(x_adv, y)
        fooled = logits.argmax(1) != y
        x_best_adv = x_adv.clone()
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        step = torch.full(shape, 2 * self.eps, device=x.device)
        x_old = x_adv.clone()
        losses = torch.zeros(self.steps, n, device=x.device)
        k, since_check = self._k0, 0
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        for i in range(self.steps):
            with torch.no_grad():
                momentum = x_adv - x_old
                x_old = x_adv
                a = 0.75 if i > 0 else 1.0
                z = self._clip(x_adv + step * grad.sign(), x)
                x_adv = self._clip(x_adv + a * (z - x_adv) + (1 - a) * momentum, x)
            grad, loss, logits = self._grad(x_adv, y)
            with torch.no_grad():
                now = logits.argmax(1) != y
                x_best_adv = torch.where((now & ~fooled).view(shape), x_adv, x_best_adv)
                fooled |= now
                losses[i] = loss
                better = loss > loss_best
                x_best = torch.where(better.view(shape), x_adv, x_best)
                grad_best = torch.where(better.view(shape), grad, grad_best)
                loss_best = torch.where(better, loss, loss_best)
                since_check += 1
                if since_check == k:
                    halve = self._oscillation(losses, i, k) | (~reduced_last & (loss_best_last >= loss_best))
                    reduced_last, loss_best_last = halve.clone(), loss_best.clone()
                    if halve.any():
                        step = torch.where(halve.view(shape), step / 2, step)
                        x_adv = torch.where(halve.view(shape), x_best, x_adv)
                        grad = torch.where(halve.view(shape), grad_best, grad)
                    k, since_check = max(k - self._kdec, self._kmin), 0
        return torch.where(fooled.view(shape), x_best_adv, x_best), fooled

    def forward(self, images, labels):
        best, fooled = images.clone(), torch.zeros(len(labels), dtype=torch.bool, device=images.device)
        if self.loss_name == "dlr-targeted":
            with torch.no_grad():
                order = self.model(images).float().sort(dim=1)[1]
            runs = [order[:, -(c + 2)] for c in range(min(self.n_target_classes, order.size(1) - 1))]
        else:
            runs = [None]
        first = True
        for targets in runs:
            for _ in range(self.restarts):
                todo = ~fooled
                if not todo.any():
                    return best
                self._targets = targets[todo] if targets is not None else None
                adv, now = self._run(images[todo], labels[todo])
                idx = todo.nonzero()[:, 0]
                take = now | first  # the first run also fills in the highest-loss points of unfooled images
                best[idx[take]] = adv[take]
                fooled[idx[now]] = True
                first = False
        self._targets = None
        return best
