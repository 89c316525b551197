"""Model folders: round trip, identical logits for identical draws, and clear errors (never pickle)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from atop_serve import load_classifier, load_pipeline, modelcard, modelio
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


def test_mirror_feeds_odd_samples_the_mirrored_image():
    """mirror=True: sample k sees x for even k and x mirrored for odd k, each with its own draws; K = 1 is
    unchanged. A pass-through purifier and a position-sensitive linear classifier make every view visible."""
    from atop_serve.config import RTConfig
    from atop_serve.pipeline import PurifiedClassifier
    from atop_serve.transforms import RTInputs

    class PassThrough(torch.nn.Module):
        def forward(self, x_t, mask):
            return x_t

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    rt = RTConfig()
    plain = PurifiedClassifier(PassThrough(), clf, rt)
    mirrored = PurifiedClassifier(PassThrough(), clf, rt, mirror=True)
    x = torch.rand(2, 3, 32, 32)
    d = draw_rt_inputs(rt, 2, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = lambda img, k: plain.run(img, RTInputs(*(t[:, k : k + 1] for t in d)))["logits"]  # noqa: E731
        expected = (one(x, 0) + one(x.flip(-1), 1) + one(x, 2)) / 3
        assert torch.allclose(mirrored.run(x, d)["logits"], expected, atol=1e-5)
        assert not torch.allclose(plain.run(x, d)["logits"], expected, atol=1e-3)
        d1 = RTInputs(*(t[:, :1] for t in d))
        assert torch.equal(mirrored.run(x, d1)["logits"], plain.run(x, d1)["logits"])
        assert torch.equal(mirrored.run(x, d)["purified"], plain.run(x, d)["purified"])  # sample 0: not mirrored


def test_card_mirror_is_read_and_checked(random_model_dir, tmp_path):
    d = _copy(random_model_dir, tmp_path / "m")
    card = modelio.read_card(d)
    card["pipeline"] = {"samples": 2, "mirror": True}
    modelio.write_card(d, card)
    assert load_pipeline(d).mirror and not load_pipeline(d, mirror=False).mirror
    card["pipeline"]["mirror"] = "yes"
    modelio.write_card(d, card)
    with pytest.raises(ModelError, match="pipeline.mirror must be true or false"):
        load_pipeline(d)


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


def test_the_shipped_default_model():
    """What ships in the repository: small, safetensors and ONNX only, the weights the card names (by sha256), a card
    that agrees with itself about the pipeline's TTA, and a pipeline that loads and classifies."""
    folder = modelio.DEFAULT_MODEL_DIR
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sum(files.values()) < 25 * 2**20, files
    assert {p.rsplit(".", 1)[-1] for p in files} <= {"json", "md", "safetensors", "onnx"}, files
    card = modelio.read_card(folder)
    assert (folder / modelcard.FILE).read_text() == modelcard.render(card), "stale MODEL_CARD.md: run `atop card`"
    for part in ("classifier", "purifier"):
        assert modelio.sha256(folder / card[part]["file"]) == card[part]["sha256"], part
    clf = card["classifier"]
    assert clf["metrics"]["tta_used_by_pipeline"] == clf["tta"]
    pipe = load_pipeline()
    logits = pipe(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, len(card["classes"])) and torch.isfinite(logits).all()
