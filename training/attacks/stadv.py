"""StAdv (Xiao et al., ICLR 2018, "Spatially transformed adversarial examples"): the non-l_p threat.

The adversarial image is the input resampled (bilinear) along a per-pixel flow field f (N, 2, H, W):
x'(p) = x(p + f(p)). The attack ascends a margin loss minus ``tau`` times the flow smoothness loss
L_flow = sum_p sum_{q in N(p)} sqrt(||du||^2 + ||dv||^2 + 1e-8) (Xiao et al.'s eq. 4), by signed gradient
steps on f, and bounds the flow as in Laidlaw et al. (ICLR 2021): ||f||_inf <= ``budget`` (default 0.05) in
``grid_sample``'s normalised coordinates, where [-1, 1] spans the image (0.05 = 0.8 px on 32 px images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, margin, uniform


def flow_loss(flow: torch.Tensor) -> torch.Tensor:
    """Smoothness of a flow (N, 2, H, W) per image: total variation over the 4-neighbourhood."""
    p = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    c = p[:, :, 1:-1, 1:-1]
    total = 0
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = p[:, :, dy : dy + flow.size(2), dx : dx + flow.size(3)]
        total = total + ((c - nb) ** 2).sum(1).add(1e-8).sqrt().flatten(1).sum(1)
    return total


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    n = images.size(0)
    eye = torch.eye(2, 3, device=images.device, dtype=images.dtype).expand(n, 2, 3)
    grid = F.affine_grid(eye, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid + flow.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                         align_corners=False)


class StAdv(Attack):
    """``StAdv(model, budget=0.05, steps=100, alpha=0.01, tau=0.05, generator=g)(images, labels)``.

    ``eps`` here is the flow budget (normalised coordinates), not a pixel budget. Per image it returns the
    first flow found that fools the model, else the last iterate."""

    name = "stadv"

    def __init__(self, model, budget=0.05, steps=100, alpha=0.01, tau=0.05, kappa=0.0,
                 generator: torch.Generator | None = None, eot_iter: int = 1):
        super().__init__(model, budget, eot_iter)
        self.budget, self.steps, self.alpha, self.tau, self.kappa, self.generator = budget, steps, alpha, tau, kappa, generator

    def forward(self, images, labels):
        n, _, h, w = images.shape
        flow = (2 * uniform((n, 2, h, w), self.generator, images.device) - 1) * (self.budget / 10)
        best = images.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=images.device)
        for _ in range(self.steps + 1):
            flow = flow.detach().requires_grad_(True)
            grad = torch.zeros_like(flow)
            for _ in range(self.eot_iter):
                x_adv = warp(images, flow)
                logits = self.model(x_adv).float()
                obj = -margin(logits, labels).clamp(min=-self.kappa) - self.tau * flow_loss(flow)
                grad += torch.autograd.grad(obj.sum(), flow)[0]
            with torch.no_grad():
                now = logits.argmax(1) != labels
                take = (now & ~fooled) | (~fooled & ~now)  # fooled images keep their first success
                best = torch.where(take.view(-1, 1, 1, 1), x_adv.detach().clamp(0, 1), best)
                fooled |= now
                flow = (flow + self.alpha * grad.sign()).clamp(-self.budget, self.budget)
        return best
