"""AutoAttack (Croce & Hein 2020): an ensemble run in sequence, each attack only on the images that are still
classified correctly, so the result is the worst case per image.

- ``standard``: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (5,000 queries).
- ``rand`` (for randomised defences): APGD-CE and APGD-DLR, each averaging gradients over ``eot_iter`` = 20
  draws of the randomness.
"""
from __future__ import annotations

import torch

from .apgd import APGD
from .base import Attack
from .fab import FAB
from .square import Square

VERSIONS = ("standard", "rand")


class AutoAttack(Attack):
    """``AutoAttack(model, eps=8/255, version="standard", steps=100, queries=5000, generator=g)(images, labels)``."""

    name = "autoattack"

    def __init__(self, model, eps=8 / 255, version="standard", steps=100, queries=5000, n_target_classes=9,
                 generator: torch.Generator | None = None, eot_iter: int | None = None):
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
        eot_iter = eot_iter if eot_iter is not None else (20 if version == "rand" else 1)
        super().__init__(model, eps, eot_iter)
        self.version, self.steps, self.queries, self.n_target_classes = version, steps, queries, n_target_classes
        self.generator = generator
        if version == "standard":
            self.attacks = [APGD(model, eps, steps, "ce", generator=generator, eot_iter=eot_iter),
                            APGD(model, eps, steps, "dlr-targeted", n_target_classes=n_target_classes,
                                 generator=generator, eot_iter=eot_iter),
                            FAB(model, eps, steps, n_target_classes, generator=generator, eot_iter=eot_iter),
                            Square(model, eps, queries, generator=generator)]
        else:
            self.attacks = [APGD(model, eps, steps, "ce", generator=generator, eot_iter=eot_iter),
                            APGD(model, eps, steps, "dlr", generator=generator, eot_iter=eot_iter)]

    def params(self) -> dict:
        p = super().params()
        p["components"] = [a.name for a in self.attacks]
        return p

    def forward(self, images, labels):
        best = images.clone()
        robust = torch.ones(len(labels), dtype=torch.bool, device=images.device)
        for attack in self.attacks:
            idx = robust.nonzero()[:, 0]
            if len(idx) == 0:
                break
            adv = attack.forward(images[idx], labels[idx])
            with torch.no_grad():
                fooled = self.model(adv).float().argmax(1) != labels[idx]
            best[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
        return best
