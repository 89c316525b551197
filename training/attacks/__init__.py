"""Adversarial attacks, one class per attack and file (torchattacks-style): ``attack(images, labels) -> adversarial``.

Every attack takes a model from images in [0, 1] to logits, works on the input gradient only, keeps its
results inside its threat model's ball and [0, 1], restores the model's train/eval mode, and draws all its
randomness from an explicit ``torch.Generator`` (never the global RNG). ``eot_iter`` averages gradients over
fresh draws of a stochastic model (EOT).

- ``FGSM``       Goodfellow et al. 2015, l_inf.
- ``PGD``        Madry et al. 2018, l_inf or l_2, random start, restarts.
- ``APGD``       Croce & Hein 2020, l_inf, losses CE (APGD-CE), DLR (APGD-DLR), targeted DLR (APGD-T).
- ``FAB``        Croce & Hein 2020, l_inf, targeted (FAB-T): minimal-norm boundary attack, counted within eps.
- ``Square``     Andriushchenko et al. 2020, l_inf, black-box (scores only).
- ``StAdv``      Xiao et al. 2018, spatial flow with smoothness loss, flow budget 0.05.
- ``AutoAttack`` ensembles ``standard`` (APGD-CE, APGD-T, FAB-T, Square) and ``rand``
                 (APGD-CE + APGD-DLR with EOT 20).
- ``EOT``        a stochastic model averaged over draws (mean logits).
- ``BPDA``       straight-through gradient for a non-differentiable step (e.g. ``Quantize8``).

``torchattacks`` is not a dependency: its release pins requests~=2.25.1, which would downgrade the
serving stack's requests/urllib3/idna.
"""
from .apgd import APGD, dlr_loss
from .autoattack import AutoAttack
from .base import BPDA, EOT, Attack, Quantize8, margin
from .fab import FAB
from .fgsm import FGSM
from .pgd import PGD
from .square import Square
from .stadv import StAdv

__all__ = ["APGD", "Attack", "AutoAttack", "BPDA", "EOT", "FAB", "FGSM", "PGD", "Quantize8", "Square", "StAdv",
           "dlr_loss", "margin"]
