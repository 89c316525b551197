"""Every registered network: output shapes, input range contract, registry errors."""
from __future__ import annotations

import pytest
import torch

from atop_serve.errors import ModelError
from atop_serve.nets.purifiers import PatchDiscriminator
from atop_serve.pipeline import TTAClassifier
from atop_serve.registry import create_classifier, create_purifier, list_models


@pytest.mark.parametrize("name", list_models("classifier"))
def test_classifier_shapes(name):
    net = create_classifier(name, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", list_models("purifier"))
def test_purifier_shapes_and_range(name):
    net = create_purifier(name).eval()
    x, m = torch.rand(3, 3, 32, 32), (torch.rand(3, 1, 32, 32) < 0.25).float()
    with torch.no_grad():
        out = net(x, m)
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_discriminator_patch_scores():
    d = PatchDiscriminator(32)
    assert d(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)).shape == (2, 16)


def test_registry_lists_required_architectures():
    assert {"airnet", "resnet18", "wrn-28-10"} <= set(list_models("classifier"))
    with pytest.raises(ModelError, match="valid: airnet"):
        create_classifier("resnet9000")


def test_whitening_init_whitens_patches():
    torch.manual_seed(0)
    net = create_classifier("airnet")
    x = torch.rand(256, 3, 32, 32) * torch.linspace(0.2, 1, 32).view(1, 1, 1, 32)
    net.init_whiten(x)
    with torch.no_grad():
        y = net.whiten(net.normalize(x)) - net.whiten.bias.view(1, -1, 1, 1)
    cov = torch.cov(y[:, :12].permute(1, 0, 2, 3).reshape(12, -1))
    assert torch.allclose(cov.diag(), torch.ones(12), atol=0.05)


@pytest.mark.parametrize("mode,passes", [("none", 1), ("flip", 2), ("flip-translate", 6)])
def test_tta_passes(mode, passes):
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            return x.mean((2, 3))

    out = TTAClassifier(Probe(), mode)(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3) and len(calls) == passes


def _flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["gated-unet", "gated-unet-lrelu", "gated-unet-s2d"])
def test_cpu_purifiers_cost_at_most_the_default_classifier(name):
    # the design rule of the CPU purifiers: forward FLOPs at most the default classifier's
    x, m = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    assert _flops(create_purifier(name).eval(), x, m) <= _flops(create_classifier("airnet").eval(), x)


def test_s2d_purifier_has_no_full_resolution_convolution():
    net = create_purifier("gated-unet-s2d").eval()
    sizes = []
    hooks = [c.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]))
             for c in net.modules() if isinstance(c, torch.nn.Conv2d)]
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    for h in hooks:
        h.remove()
    assert sizes and max(sizes) == 16
