"""Random transforms RT1/RT2/RT3 as pure tensor functions (see ``RTConfig`` for the exact definition)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import RTConfig


class RTInputs(NamedTuple):
    """Standard random draws, each with leading dims (N, K, V): see ``RTConfig.input_shapes``."""

    u_mask: torch.Tensor
    z: torch.Tensor
    u_mix: torch.Tensor

    def flat(self) -> "RTInputs":
        """Merge (N, K) into one batch dim of N*K (sample-major within each image)."""
        return RTInputs(*(t.reshape(-1, *t.shape[2:]) for t in self))


def draw_rt_inputs(
    cfg: RTConfig, n: int, k: int = 1, generator: torch.Generator | None = None, device=None
) -> RTInputs:
    shp = cfg.input_shapes(n, k)
    dev = device if device is not None else (generator.device if generator is not None else "cpu")
    u_mask = torch.rand(shp["u_mask"], generator=generator, device=dev)
    z = torch.randn(shp["z"], generator=generator, device=dev)
    u_mix = 1.0 - torch.rand(shp["u_mix"], generator=generator, device=dev)
    return RTInputs(u_mask, z, u_mix)


def block_mask(u_mask: torch.Tensor, cfg: RTConfig) -> torch.Tensor:
    """(B, V, 1, G, G) uniforms -> (B, V, 1, H, W) mask, 1 where a pixel is missing."""
    m = (u_mask < cfg.rate).to(u_mask.dtype)
    b, v, c, g, _ = m.shape
    s = cfg.block
    return m.view(b, v, c, g, 1, g, 1).expand(b, v, c, g, s, g, s).reshape(b, v, c, g * s, g * s)


def random_transform(x: torch.Tensor, cfg: RTConfig, inputs: RTInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RT to images x (B, 3, H, W) in [0, 1] with flat draws (leading dims (B, V)).

    Returns (transformed image (B, 3, H, W), mask (B, 1, H, W))."""
    m = block_mask(inputs.u_mask, cfg)
    views = x.unsqueeze(1)
    if cfg.sigma > 0:
        views = (views + cfg.sigma * inputs.z).clamp(0.0, 1.0)
    views = views * (1.0 - m)
    if cfg.views == 1:
        return views[:, 0], m[:, 0]
    w = -torch.log(inputs.u_mix)
    w = (w / w.sum(dim=1, keepdim=True)).view(*w.shape, 1, 1, 1)
    return (w * views).sum(1).clamp(0.0, 1.0), (w * m).sum(1).clamp(0.0, 1.0)  # clamp: rounding of sum(w) = 1
