"""Classifiers: images in [0, 1] (N, 3, H, W) -> logits. Normalisation happens inside the model.

- ``airnet`` (default): the airbench94 design (Keller Jordan): frozen-scale BatchNorm, a 2x2 patch-whitening
  first conv initialised from data, identity-initialised convs, widths 64/256/256, GELU, scaled logits.
  About 2 M parameters and 0.24 GFLOPs per image: fast on a 2-core CPU.
- ``airnet-wide``: the same design at airbench95's widths 128/384/384 (2.3x the parameters; not trained here).
- ``resnet18``: the CIFAR ResNet-18 of the AToP paper (3x3 stem, no max-pool).
- ``wrn-28-10``: WideResNet-28-10 (for GPU runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_classifier

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------------- airnet
class _FrozenScaleBN(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (airbench): only the bias learns."""

    def __init__(self, num_features, momentum=0.6, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _DiracConv(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])  # start as identity on the first cin channels


class _ConvGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.norm1 = _DiracConv(cin, cout), _FrozenScaleBN(cout)
        self.conv2, self.norm2 = _DiracConv(cout, cout), _FrozenScaleBN(cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    def __init__(self, num_classes=10, widths=(64, 256, 256), whiten_width=24, logit_scale=1 / 9):
        super().__init__()
        self.normalize = Normalize()
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True)
        chans = (whiten_width, *widths)
        self.layers = nn.Sequential(*[_ConvGroup(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2x2 patches of ``images`` (N, 3, H, W in [0, 1])."""
        x = self.normalize(images.float())
        c, k = x.size(1), self.whiten.kernel_size[0]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k).double()
        cov = torch.cov(patches.T)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = (eigvec.T / torch.sqrt(eigval.view(-1, 1) + eps)).view(-1, c, k, k).flip(0).float()
        half = w.size(0)
        self.whiten.weight[:half] = w
        self.whiten.weight[half : 2 * half] = -w
        self.whiten.bias.zero_()

    def forward(self, x):
        x = F.gelu(self.whiten(self.normalize(x)))
        x = self.layers(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.logit_scale


@register_classifier
def airnet(num_classes: int = 10) -> nn.Module:
    return AirNet(num_classes)


@register_classifier(name="airnet-wide")
def airnet_wide(num_classes: int = 10) -> nn.Module:
    return AirNet(num_classes, widths=(128, 384, 384))


# --------------------------------------------------------------------------------------------- resnet18
class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(self.normalize(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_classifier
def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)


# -------------------------------------------------------------------------------------------- wrn-28-10
class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth=28, width=10, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.normalize = Normalize()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, stride in enumerate([1, 2, 2]):
            for j in range(n):
                blocks.append(_WideBlock(cin, widths[i + 1], stride if j == 0 else 1))
                cin = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(self.normalize(x)))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_classifier(name="wrn-28-10")
def wrn_28_10(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 10, num_classes)
