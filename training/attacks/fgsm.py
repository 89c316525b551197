"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps, l_inf."""
from __future__ import annotations

from .base import Attack


class FGSM(Attack):
    """x' = clip(x + eps * sign(grad_x loss)). ``FGSM(model, eps=8/255)(images, labels)``; images in [0, 1]."""

    name = "fgsm"

    def __init__(self, model, eps: float = 8 / 255, eot_iter: int = 1):
        super().__init__(model, eps, eot_iter)

    def forward(self, images, labels):
        g, _, _ = self._grad(images, labels)
        return self._clip(images + self.eps * g.sign(), images)
