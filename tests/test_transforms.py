"""Random transforms: shapes, ranges, missing rate, determinism, and torch/numpy draw agreement."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atop_serve.config import RTConfig, draw_rt_inputs_numpy
from atop_serve.transforms import RTInputs, block_mask, draw_rt_inputs, random_transform


def _apply(cfg, n=64, seed=0, x=None):
    x = torch.rand(n, 3, 32, 32) if x is None else x
    d = draw_rt_inputs(cfg, n, 1, torch.Generator().manual_seed(seed)).flat()
    return x, *random_transform(x, cfg, d)


@pytest.mark.parametrize("kind", ["rt1", "rt2", "rt3"])
def test_shapes_and_range(kind):
    cfg = RTConfig.named(kind, sigma=0.2)
    x, xt, m = _apply(cfg)
    assert xt.shape == x.shape and m.shape == (64, 1, 32, 32)
    assert xt.min() >= 0 and xt.max() <= 1 and m.min() >= 0 and m.max() <= 1


def test_missing_rate_and_block_structure():
    cfg = RTConfig.named("rt1", rate=0.25)
    _, xt, m = _apply(cfg, n=512)
    assert abs(m.mean().item() - 0.25) < 0.01
    # blocks are 4x4 and aligned: the mask is constant inside each block
    blocks = m.view(512, 1, 8, 4, 8, 4)
    assert torch.equal(blocks.amax((3, 5)), blocks.amin((3, 5)))
    assert torch.all(xt[m.expand_as(xt) == 1] == 0)


def test_rt1_keeps_visible_pixels_and_rt2_adds_noise_of_sigma():
    x = torch.full((256, 3, 32, 32), 0.5)
    _, xt1, m1 = _apply(RTConfig.named("rt1"), n=256, x=x)
    vis = m1.expand_as(x) == 0
    assert torch.equal(xt1[vis], x[vis])
    _, xt2, m2 = _apply(RTConfig.named("rt2", sigma=0.1), n=256, x=x)
    resid = (xt2 - x)[m2.expand_as(x) == 0]
    assert abs(resid.std().item() - 0.1) < 0.005


def test_rt3_mixes_views_with_convex_weights():
    cfg = RTConfig.named("rt3", sigma=0.0, views=3)
    x = torch.rand(128, 3, 32, 32)
    _, xt, m = _apply(cfg, n=128, x=x)
    assert cfg.views == 3
    # soft mask: some pixels partly missing; where visible in every view, the pixel is unchanged
    assert ((m > 0) & (m < 1)).any()
    assert torch.allclose(xt[m.expand_as(x) == 0], x[m.expand_as(x) == 0])
    assert torch.allclose(xt, x * (1 - m), atol=1e-6)  # sigma 0: sum_v w_v x (1 - m_v) = x (1 - m)


def test_determinism_under_fixed_generator():
    cfg = RTConfig.named("rt2", sigma=0.1)
    x = torch.rand(8, 3, 32, 32)
    _, a, _ = _apply(cfg, 8, seed=3, x=x)
    _, b, _ = _apply(cfg, 8, seed=3, x=x)
    _, c, _ = _apply(cfg, 8, seed=4, x=x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_numpy_draws_match_the_graph_contract():
    cfg = RTConfig.named("rt3", sigma=0.1, views=3)
    d = draw_rt_inputs_numpy(cfg, 5, 2, np.random.default_rng(0))
    t = draw_rt_inputs(cfg, 5, 2, torch.Generator().manual_seed(0))
    for name, arr in d.items():
        assert arr.shape == tuple(getattr(t, name).shape) and arr.dtype == np.float32
    assert d["u_mix"].min() > 0  # log() is finite
    # the same numbers give the same transform whichever library drew them
    ins = RTInputs(*(torch.from_numpy(d[k]) for k in ("u_mask", "z", "u_mix"))).flat()
    x = torch.rand(10, 3, 32, 32)
    xt, m = random_transform(x, cfg, ins)
    assert torch.equal(m[0:1], (block_mask(ins.u_mask[0:1], cfg) * ins.u_mix[0:1].log().neg().div(ins.u_mix[0:1].log().neg().sum()).view(1, 3, 1, 1, 1)).sum(1))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown random transform"):
        RTConfig(kind="rt9")
    with pytest.raises(ValueError, match="divide"):
        RTConfig(block=5)
    with pytest.raises(ValueError, match="unknown RT config keys"):
        RTConfig.from_dict({"kind": "rt2", "bogus": 1})
