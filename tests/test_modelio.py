"""Model folders: round trip, identical logits for identical draws, and clear errors (never pickle)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from atop_serve import load_classifier, load_pipeline, modelio
from atop_serve.errors import ModelError
from atop_serve.transforms import draw_rt_inputs



def test_round_trip_and_identical_logits(random_model_dir):
    pipe = load_pipeline(random_model_dir)
    assert not pipe.training and all(not p.requires_grad for p in pipe.parameters())
    x = torch.rand(4, 3, 32, 32)
    d = draw_rt_inputs(pipe.transform, 4, 2, torch.Generator().manual_seed(0))
    a, b = pipe(x, rt_inputs=d), load_pipeline(random_model_dir)(x, rt_inputs=d)
    assert torch.equal(a, b)
    # fresh randomness on every call by default
    assert not torch.equal(pipe(x), pipe(x))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pipe(x, generator=g1), pipe(x, generator=g2))


def test_samples_average(random_model_dir):
    pipe = load_pipeline(random_model_dir, samples=3)
    x = torch.rand(2, 3, 32, 32)
    d = draw_rt_inputs(pipe.transform, 2, 3, torch.Generator().manual_seed(0))
    out = pipe.run(x, d)
    assert out["probs"].shape == (2, 10) and torch.allclose(out["probs"].sum(1), torch.ones(2))
    assert pipe(x).shape == (2, 10)


def test_pipeline_is_differentiable(random_model_dir):
    pipe = load_pipeline(random_model_dir)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    pipe(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_card(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="card.json is missing"):
        load_pipeline(tmp_path / "empty")


def test_missing_weights(random_model_dir, tmp_path):
    d = _copy(random_model_dir, tmp_path / "m")
    (d / modelio.PURIFIER_FILE).unlink()
    with pytest.raises(ModelError, match="missing"):
        load_pipeline(d)


def test_wrong_architecture(random_model_dir, tmp_path):
    d = _copy(random_model_dir, tmp_path / "m")
    card = json.loads((d / "card.json").read_text())
    card["classifier"]["arch"] = "resnet18"
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match architecture"):
        load_classifier(d)
    card["classifier"]["arch"] = "nonexistent-net"
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unknown classifier architecture"):
        load_classifier(d)


def test_corrupted_weights_and_pickle_are_refused(random_model_dir, tmp_path):
    d = _copy(random_model_dir, tmp_path / "m")
    raw = (d / modelio.CLASSIFIER_FILE).read_bytes()
    (d / modelio.CLASSIFIER_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="corrupt weights"):
        load_classifier(d)
    # a pickle dropped in place of the weights is never unpickled
    torch.save({"x": torch.zeros(1)}, d / modelio.CLASSIFIER_FILE)
    with pytest.raises(ModelError, match="corrupt weights"):
        load_classifier(d)


def test_corrupt_card(random_model_dir, tmp_path):
    d = _copy(random_model_dir, tmp_path / "m")
    (d / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt model card"):
        load_pipeline(d)
