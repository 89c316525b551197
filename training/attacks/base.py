"""The attack contract and the wrappers shared by every attack: ``Attack``, ``EOT``, ``BPDA``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U[0, 1) drawn from ``generator`` (on its own device) and moved to ``device``: CPU generators serve GPU runs."""
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def normal(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=dev).to(device)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per image: negative exactly where the image is misclassified."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - other


class Attack:
    """Base class: ``attack(images, labels) -> adversarial images``. Subclasses write only ``forward``.

    ``__call__`` puts the model in eval mode (restoring every submodule's mode afterwards), detaches the inputs and enables
    gradients. ``eot_iter > 1`` averages every input gradient over that many forward passes of a stochastic
    model (expectation over transformation, Athalye et al. 2018), each with fresh randomness.
    """

    name = "attack"

    def __init__(self, model: nn.Module, eps: float, eot_iter: int = 1):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if eot_iter < 1:
            raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
        self.model, self.eps, self.eot_iter = model, eps, eot_iter

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # every submodule's own mode is restored afterwards, not the top module's mode pushed down: a wrapper
        # built on the fly is in train mode by default, and ``train(True)`` on it would leave the wrapped
        # model's batch norms in train mode (batch statistics, running-stat updates) for whatever runs next
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.enable_grad():
                return self.forward(images.detach(), labels.detach()).detach()
        finally:
            for m, mode in modes:
                m.training = mode

    def batched(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``self(images, labels)`` in chunks of ``batch_size`` (memory), concatenated; one generator stream."""
        return torch.cat([self(images[i:i + batch_size], labels[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])

    def forward(self, images, labels):  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict:
        """The attack's settings (plain numbers and strings), for reports."""
        return {"attack": self.name, **{k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool))}}

    def loss(self, logits, labels):
        """Per-image loss the attack ascends (cross-entropy unless a subclass says otherwise)."""
        return F.cross_entropy(logits, labels, reduction="none")

    def _grad(self, x, labels, loss_fn=None):
        """Input gradient of the summed loss, averaged over ``eot_iter`` passes; also returns the last pass's
        per-image loss and logits."""
        loss_fn = loss_fn or self.loss
        x = x.clone().requires_grad_(True)
        grad = torch.zeros_like(x)
        for _ in range(self.eot_iter):
            logits = self.model(x).float()
            per = loss_fn(logits, labels)
            grad += torch.autograd.grad(per.sum(), x)[0]
        return grad / self.eot_iter, per.detach(), logits.detach()

    def _clip(self, x_adv, images):
        """Project into the l_inf eps-ball around ``images`` and into [0, 1]."""
        return torch.min(torch.max(x_adv, images - self.eps), images + self.eps).clamp(0, 1)


class EOT(nn.Module):
    """A stochastic model made smoother: output = mean logits of ``samples`` forward passes, each with fresh
    randomness. (Attacks average gradients themselves through ``eot_iter``; this wrapper averages logits.)"""

    def __init__(self, model: nn.Module, samples: int = 8):
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, x):
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class BPDA(nn.Module):
    """Backward-pass differentiable approximation (Athalye et al. 2018) of a non-differentiable step.

    The forward pass runs ``step`` exactly; the backward pass treats it as the identity (the standard
    approximation for steps with g(x) ~ x, e.g. quantisation, JPEG, median filters). Put it wherever such a
    step sits between the attacker's input and the logits."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, x):
        with torch.no_grad():
            y = self.step(x)
        return _StraightThrough.apply(x, y)


class Quantize8(nn.Module):
    """Round to 8-bit levels, as the service does when it decodes an uploaded image (not differentiable)."""

    def forward(self, x):
        return torch.round(x.clamp(0, 1) * 255) / 255
