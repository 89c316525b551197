"""Adversarial attacks, one class per attack (torchattacks-style): ``attack(images, labels) -> adversarial``.

Every attack takes a model from images in [0, 1] to logits, works on the input gradient only, keeps results
inside the epsilon ball and [0, 1], restores the model's train/eval mode, and draws its random start from an
explicit ``torch.Generator`` (never the global RNG).

- ``FGSM``  Goodfellow et al. 2015, l_inf.
- ``PGD``   Madry et al. 2018, l_inf or l_2, random start, ``restarts`` (keeps the worst case per image).
- ``EOT``   wraps a stochastic model: the gradient is averaged over ``samples`` forward passes, each with
           fresh randomness (Athalye et al. 2018), for attacks on the purified pipeline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attack:
    name = "attack"

    def __init__(self, model: nn.Module, eps: float):
        self.model, self.eps = model, eps

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                return self.forward(images.detach(), labels.detach()).detach()
        finally:
            self.model.train(was_training)

    def forward(self, images, labels):  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool))}

    def _grad(self, x, labels):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(self.model(x).float(), labels, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


class FGSM(Attack):
    """One signed-gradient step of size eps (l_inf)."""

    name = "fgsm"

    def forward(self, images, labels):
        g = self._grad(images, labels)
        return (images + self.eps * g.sign()).clamp(0, 1)


class PGD(Attack):
    """Projected gradient descent, l_inf (signed steps) or l_2 (normalised steps), with random start."""

    name = "pgd"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", random_start=True,
                 restarts=1, generator: torch.Generator | None = None):
        super().__init__(model, eps)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
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
            u = torch.rand(images.shape, generator=self.generator, device=images.device)
            return (2 * u - 1) * self.eps
        d = torch.randn(images.shape, generator=self.generator, device=images.device)
        r = torch.rand(images.size(0), generator=self.generator, device=images.device).view(-1, 1, 1, 1)
        return d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r * self.eps

    def _run(self, images, labels):
        delta = self._project(self._start(images))
        x = (images + delta).clamp(0, 1)
        for _ in range(self.steps):
            g = self._grad(x, labels)
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


class EOT(nn.Module):
    """Expectation over transformation: a model whose output is the mean logits of ``samples`` stochastic
    forward passes, so any gradient attack on it averages gradients over the randomness."""

    def __init__(self, model: nn.Module, samples: int = 8):
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, x):
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)
