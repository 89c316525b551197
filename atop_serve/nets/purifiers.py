"""Purifier g (an inpainting generator in the DeepFillv2 family) and its SN-PatchGAN discriminator.

The purifier takes the randomly transformed image and its mask channel (N, 4, H, W) and returns the full
repaired image (N, 3, H, W) in [0, 1]: it denoises and inpaints, and its whole output is used (no composite
with the visible pixels, as in the AToP code), so perturbations on visible pixels are repaired too.

``gated-unet``: gated convolutions (ELU(feature) * sigmoid(gate), as DeepFillv2), two stride-2 stages down to
8x8, dilated gated convolutions in the middle (dilation 1, 2, 4), and a decoder that upsamples and adds the
encoder features. Widths are chosen so its forward FLOPs stay below the default classifier's
(counted in the model card). ``gated-unet-lrelu``: the same network with LeakyReLU(0.2) on the feature half,
the same parameters (weights carry over), and cheaper in int8: ONNX Runtime runs a quantised LeakyReLU as a
256-entry table, while ELU has no quantised kernel and goes through float. ``gated-unet-paper`` is a wider
configuration for GPU runs. ``gated-unet-s2d`` drops the full-resolution layers to make purification cheaper
than classification on a CPU (see its class; trained by distillation from the default, docs/model.md, "Toward the
overhead bar").
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..registry import register_purifier


ACTIVATIONS = {"elu": F.elu, "lrelu": partial(F.leaky_relu, negative_slope=0.2)}


class GatedConv(nn.Module):
    """DeepFillv2 gated convolution: act(conv_f(x)) * sigmoid(conv_g(x)), computed as one conv."""

    def __init__(self, cin, cout, k=3, stride=1, dilation=1, act: str = "elu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}")
        self.conv = nn.Conv2d(cin, 2 * cout, k, stride, padding=dilation * (k - 1) // 2, dilation=dilation)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        y = self.conv(x)
        c = self.conv.out_channels // 2  # slices, not chunk(): the ONNX exporter turns chunk into a tensor sequence
        f, g = y[:, :c], y[:, c:]
        return self.act(f) * torch.sigmoid(g)


class GatedUNet(nn.Module):
    def __init__(self, width: int = 32, dilations=(1, 2, 4), in_channels: int = 4, act: str = "elu"):
        super().__init__()
        c = width
        self.e1 = GatedConv(in_channels, c, act=act)  # 32x32
        self.e2 = GatedConv(c, 2 * c, stride=2, act=act)  # 16x16
        self.e3 = GatedConv(2 * c, 4 * c, stride=2, act=act)  # 8x8
        self.mid = nn.Sequential(*[GatedConv(4 * c, 4 * c, dilation=d, act=act) for d in dilations])
        self.r2 = nn.Conv2d(4 * c, 2 * c, 1)
        self.d2 = GatedConv(2 * c, 2 * c, act=act)  # 16x16
        self.r1 = nn.Conv2d(2 * c, c, 1)
        self.d1 = GatedConv(c, c, act=act)  # 32x32
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x_t: transformed images (N, 3, H, W) in [0, 1]; mask: (N, 1, H, W), 1 where a pixel is missing."""
        h1 = self.e1(torch.cat([x_t * 2 - 1, mask], dim=1))
        h2 = self.e2(h1)
        h = self.mid(self.e3(h2))
        h = self.d2(F.interpolate(self.r2(h), scale_factor=2.0, mode="nearest") + h2)
        h = self.d1(F.interpolate(self.r1(h), scale_factor=2.0, mode="nearest") + h1)
        return torch.sigmoid(self.out(h))


class GatedUNetS2D(nn.Module):
    """The gated U-Net without full-resolution layers: the 32x32 input (image + mask) enters folded 2x2
    space-to-depth into 16x16 (lossless: 16 channels), one stride-2 stage goes to 8x8 where the dilated gated
    convolutions run, and the output leaves by depth-to-space from 16x16. On a CPU the full-resolution layers of
    ``gated-unet`` (few channels, 1,024 positions) cost far more time per FLOP than the 8x8 ones; this design has
    none, and 0.78x the default classifier's FLOPs (counted in tests/test_nets.py)."""

    def __init__(self, width: int = 32, dilations=(1, 2, 4), in_channels: int = 4, act: str = "lrelu"):
        super().__init__()
        c = width
        self.e1 = GatedConv(4 * in_channels, 2 * c, act=act)  # 16x16
        self.e2 = GatedConv(2 * c, 4 * c, stride=2, act=act)  # 8x8
        self.mid = nn.Sequential(*[GatedConv(4 * c, 4 * c, dilation=d, act=act) for d in dilations])
        self.r1 = nn.Conv2d(4 * c, 2 * c, 1)
        self.d1 = GatedConv(2 * c, 2 * c, act=act)  # 16x16
        self.out = nn.Conv2d(2 * c, 4 * 3, 3, padding=1)  # 2x2 x RGB per 16x16 position

    def forward(self, x_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h1 = self.e1(F.pixel_unshuffle(torch.cat([x_t * 2 - 1, mask], dim=1), 2))
        h = self.mid(self.e2(h1))
        h = self.d1(F.interpolate(self.r1(h), scale_factor=2.0, mode="nearest") + h1)
        return torch.sigmoid(F.pixel_shuffle(self.out(h), 2))


@register_purifier
def gated_unet() -> nn.Module:
    return GatedUNet(width=32)


@register_purifier
def gated_unet_lrelu() -> nn.Module:
    return GatedUNet(width=32, act="lrelu")


@register_purifier(name="gated-unet-s2d")
def gated_unet_s2d() -> nn.Module:
    return GatedUNetS2D(width=32)


@register_purifier
def gated_unet_paper() -> nn.Module:
    return GatedUNet(width=96, dilations=(1, 2, 4, 8, 1))


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN: spectral-normalised 5x5 stride-2 convs; one score per patch (hinge loss)."""

    def __init__(self, width: int = 64, in_channels: int = 4):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(spectral_norm(nn.Conv2d(a, b, 5, 2 if i < 3 else 1, 2)))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(spectral_norm(nn.Conv2d(chans[-1], 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x * 2 - 1, mask], dim=1)).flatten(1)
