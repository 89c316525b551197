"""`atop export`: ONNX round trip, verification, faster variant, BentoML registration, errors.

One export per session (random-weight model, small verification set), reused by most tests. Random airnet
logits are ~1e-5 (its purifier output is nearly constant), which would make the 1e-4 tolerance vacuous, so the
test model's classifier head is scaled to give logits of realistic size (~10).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from atop_serve import modelcard, modelio
from atop_serve.errors import DataError, ExportError

from .conftest import make_model_folder, needs_data

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")  # bentoml's dependency

HEAD_SCALE = 3e5
VERIFY_N = 100


def _scaled_model_folder(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = make_model_folder(path)
    f = folder / modelio.CLASSIFIER_FILE
    state = load_file(str(f))
    state["head.weight"] = state["head.weight"] * HEAD_SCALE
    save_file(state, str(f))
    card = modelio.read_card(folder)
    card["pipeline"] = {"mirror": True}  # as shipped: the round trip at K = 3 checks the mirrored samples
    card["classifier"]["sha256"] = modelio.sha256(f)
    card["classifier"]["metrics"] = {"test_acc_tta_flip": 0.1, "measured_on": "random weights"}
    modelio.write_card(folder, card)
    return folder


@pytest.fixture(scope="session")
def bento_home(tmp_path_factory):
    """A private BentoML store: BENTOML_HOME set and the already-built singletons overridden, so the store is
    isolated even if another test imported bentoml first."""
    home = tmp_path_factory.mktemp("bentoml")
    (home / "models").mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(home))
    mp.setenv("BENTOML_DO_NOT_TRACK", "True")
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store_dir.set(str(home / "models"))
    BentoMLContainer.model_store.set(ModelStore(str(home / "models")))
    yield home
    for p in (BentoMLContainer.model_store, BentoMLContainer.model_store_dir, BentoMLContainer.bentoml_home):
        p.reset()
    mp.undo()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return _scaled_model_folder(tmp_path_factory.mktemp("export-src") / "model")


@pytest.fixture(scope="session")
def pipeline(model_dir):
    return modelio.load_pipeline(model_dir)


@pytest.fixture(scope="session")
def exported(model_dir, bento_home, tmp_path_factory):
    from export.build import export_model

    out = tmp_path_factory.mktemp("export-out") / "serving"
    summary = export_model(model_dir, out, name="atop-test", verify_n=VERIFY_N, calib_n=64, bench_reps=2,
                           command="pytest", log=lambda m: None)
    return {"summary": summary, "out": out, "card": json.loads((out / modelio.CARD).read_text())}


def _session(path):
    from export.onnx_export import make_session

    return make_session(path)


# ------------------------------------------------------------------------------------------ ONNX round trip
@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 3), (64, 1)])
def test_round_trip(exported, pipeline, n, k):
    from export.verify import compare_logits, draws, eager_logits, session_logits

    rng = np.random.default_rng(n)
    images = rng.random((n, 3, 32, 32), dtype=np.float32)
    d = draws(pipeline.transform, n, k, seed=n + k)
    ref = eager_logits(pipeline, images, d)
    res = compare_logits(ref, session_logits(_session(exported["out"] / modelio.ONNX_FILE), images, d))
    assert np.abs(ref).max() > 1.0  # the tolerance below means something
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0, res


def test_serving_folder(exported, model_dir):
    out, card = exported["out"], exported["card"]
    src = json.loads((model_dir / modelio.CARD).read_text())
    assert {k: card[k] for k in src} == src  # the source card, copied
    ex = card["export"]
    assert (out / modelio.ONNX_FILE).exists() and not list(out.parent.glob(".serving.*"))  # no temp dirs left
    assert set(ex["files"]) == {p.name for p in out.iterdir()} - {modelio.CARD, modelcard.FILE}
    assert (out / modelcard.FILE).read_text() == modelcard.render(card)  # the page people read, from this card
    for f, rec in ex["files"].items():
        assert rec["sha256"] == modelio.sha256(out / f)
    assert ex["opset"] >= 17 and ex["formats"] == ["onnx"] and ex["command"] == "pytest"
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(ex["versions"])
    ver = ex["verification"]["onnx"]
    assert ver["passed"] and ver["n"] == VERIFY_N and ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0
    assert ver["multi_sample"]["passed"] and ver["multi_sample"]["k"] == 3
    names = [i["name"] for i in ex["graph"]["inputs"]]
    assert names[0] == "images" and set(names) <= {"images", "u_mask", "z", "u_mix"}
    assert ex["graph"]["inputs"][0]["shape"] == ["N", 3, 32, 32]
    assert [o["name"] for o in ex["graph"]["outputs"]][:2] == ["probs", "logits"]
    # gated convolutions split their output with slices: a tensor sequence (SplitToSequence + SequenceAt, what
    # chunk() exports to) cost 12 % of the int8 graph's time
    import onnx

    ops = {node.op_type for node in onnx.load(str(out / modelio.ONNX_FILE), load_external_data=False).graph.node}
    assert "Conv" in ops and not ops & {"SplitToSequence", "SequenceAt"}, sorted(ops)


@needs_data()
def test_verified_on_real_test_images(exported):
    images = exported["card"]["export"]["verification"]["onnx"]["images"]
    assert images["labelled"] and "'test'" in images["source"]


@needs_data()  # the robust gate attacks labelled test images
def test_cpu_variant_recorded(exported):
    ex = exported["card"]["export"]
    rec = ex["cpu_variant"]
    built = {k: c for k, c in rec["candidates"].items() if c["built"]}
    assert "ort-offline" in built
    for c in built.values():
        assert c["speedup"] > 0 and c["accepted"] in (True, False)
        if "clean" in c:
            assert 0 <= c["clean"]["top1_agreement_with_fp32"] <= 1  # measured (fast enough): clean and robust gates, paired with fp32 at the card's K
            assert c["clean"]["n"] == VERIFY_N and c["robust"]["n"] == VERIFY_N
            assert c["accepted"] == (c["clean"]["drop_points"] <= 0.5 and c["robust"]["drop_points"] <= 0.5
                                     and c["speedup"] >= 1.1)
        else:
            assert c["speedup"] < 1.1 and not c["accepted"]
    assert rec["robust_set"]["n"] == VERIFY_N and "PGD-20" in rec["robust_set"]["source"]
    if rec["shipped"]:
        assert built[rec["shipped"]]["accepted"] and modelio.OPT_ONNX_FILE in ex["files"]
        assert _session(exported["out"] / modelio.OPT_ONNX_FILE).run(["probs"], _feed(exported["out"], 2))[0].shape == (2, 10)
    else:
        assert not (exported["out"] / modelio.OPT_ONNX_FILE).exists()


@needs_data()  # the robust gate attacks labelled test images
def test_variant_gate_checks_robust_accuracy(exported, pipeline, tmp_path, monkeypatch):
    """With a tolerance no candidate can meet, the int8 candidate is rejected on both gates, robust included;
    the int8 graph keeps the layers at the image and class ends in fp32."""
    from export import optimize, verify

    out = exported["out"]
    import onnx

    graph = onnx.load(str(out / modelio.ONNX_FILE), load_external_data=False).graph
    weight_of = {n.name: n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    kept = {weight_of[n].split(".", 1)[1].removesuffix(".weight") for n in optimize.edge_layers(out / modelio.ONNX_FILE)}
    assert kept == {"purifier.e1.conv", "purifier.out", "classifier.classifier.whiten", "classifier.classifier.head"}
    vset = verify.load_images(40, None, "test", 0)
    robust = verify.adversarial_set(pipeline.classifier, vset, 40, steps=2)
    assert robust.images.shape == vset.images.shape and np.abs(robust.images - vset.images).max() <= 8 / 255 + 1e-6
    monkeypatch.setitem(verify.TOLERANCES, "cpu-variant", {**verify.TOLERANCES["cpu-variant"], "min_speedup": 0.0,
                                                           "max_accuracy_drop": -1.01})
    calib = verify.load_images(20, None, "train", 0)
    path, rec = optimize.select_variant(out / modelio.ONNX_FILE, tmp_path, vset, pipeline.transform, calib.images, "t",
                                        candidates=("int8",), reps=1, samples=2, robust=robust, log=lambda m: None)
    c = rec["candidates"]["int8"]
    assert path is None and rec["shipped"] is None and not c["accepted"] and rec["k"] == 2
    assert "robust accuracy" in c["reason"] and "clean accuracy" in c["reason"]
    assert c["calibration"]["kept_fp32"] == optimize.edge_layers(out / modelio.ONNX_FILE)


def _feed(folder, n):
    from atop_serve.config import RTConfig, draw_rt_inputs_numpy
    from export.onnx_export import feed_for

    card = json.loads((folder / modelio.CARD).read_text())
    d = draw_rt_inputs_numpy(RTConfig.from_dict(card["purifier"]["rt"]), n, 1)
    names = [i["name"] for i in card["export"]["graph"]["inputs"]]
    return feed_for(names, np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32), d)


# -------------------------------------------------------------------------------------------- verification
def test_verification_fails_on_perturbed_weight(exported, pipeline, tmp_path):
    import onnx

    from export.verify import load_images, verify_onnx

    model = onnx.load(str(exported["out"] / modelio.ONNX_FILE))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[: w.size // 10] *= 1.05
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(model, str(tmp_path / "perturbed.onnx"))
    vset = load_images(20, None)
    with pytest.raises(ExportError, match="max abs logit diff"):
        verify_onnx(pipeline, tmp_path / "perturbed.onnx", vset)
    verify_onnx(pipeline, exported["out"] / modelio.ONNX_FILE, vset)  # the unperturbed graph passes


def test_failed_verification_leaves_nothing(model_dir, bento_home, tmp_path, monkeypatch):
    """A weight perturbed between export and verification: non-zero outcome, no folder, no store entry."""
    import torch

    from export import onnx_export, store
    from export.build import export_model

    real = onnx_export.export_onnx

    def export_then_perturb(pipeline, out, **kw):
        path = real(pipeline, out, **kw)
        with torch.no_grad():
            pipeline.classifier.classifier.head.weight.mul_(1.01)
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", export_then_perturb)
    with pytest.raises(ExportError, match="verification of pipeline.onnx"):
        export_model(model_dir, tmp_path / "new" / "serving", name="atop-bad", verify_n=20, optimize=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # not even the parent it created
    assert not any(e["tag"].startswith("atop-bad:") for e in store.list_entries())


def test_random_image_fallback(monkeypatch, tmp_path):
    from export.verify import load_images

    monkeypatch.setenv("ATOP_DATA", str(tmp_path / "absent"))
    vset = load_images(10, None)
    assert vset.labels is None and vset.images.shape == (10, 3, 32, 32) and "uniform random" in vset.source
    with pytest.raises(DataError):
        load_images(10, tmp_path / "absent")  # an explicitly named dataset must exist


def test_in_place_export(model_dir, tmp_path):
    import shutil

    from export.build import export_model

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / modelio.OPT_ONNX_FILE).write_bytes(b"stale variant of an earlier export")
    weights = {f: modelio.sha256(folder / f) for f in (modelio.CLASSIFIER_FILE, modelio.PURIFIER_FILE)}
    export_model(folder, folder, register=False, verify_n=20, optimize=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs
    assert {f: modelio.sha256(folder / f) for f in weights} == weights
    assert not (folder / modelio.OPT_ONNX_FILE).exists()
    card = modelio.read_card(folder)
    assert card["export"]["verification"]["onnx"]["passed"] and (folder / modelio.ONNX_FILE).exists()
    assert "## Export" in (folder / modelcard.FILE).read_text()  # moved in with the new card
    modelio.load_pipeline(folder)  # still a complete model folder


def test_replacing_a_serving_folder(tmp_path):
    from export.build import _commit, _prepare_target

    out = tmp_path / "serving"
    out.mkdir()
    (out / modelio.CARD).write_text("{}")
    (out / "old-only.txt").write_text("from the earlier export")
    new = tmp_path / ".serving.export-x"
    new.mkdir()
    (new / modelio.CARD).write_text('{"new": 1}')
    assert _prepare_target(out, in_place=False) == []
    _commit(new, out, in_place=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]
    assert sorted(p.name for p in out.iterdir()) == [modelio.CARD] and json.loads((out / modelio.CARD).read_text()) == {"new": 1}
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to replace"):
        _prepare_target(other, in_place=False)


# ------------------------------------------------------------------------------------------- model store
def test_store_entry(exported, bento_home):
    import bentoml

    tag = exported["summary"]["tag"]
    assert tag.startswith("atop-test:")
    ref = bentoml.models.get(tag)  # name:version
    assert Path(ref.path).resolve().is_relative_to(bento_home.resolve())  # the isolated store, not ~/bentoml
    meta, labels = ref.info.metadata, ref.info.labels
    assert meta["classes"][0] == "airplane" and len(meta["classes"]) == 10
    assert meta["rt"]["kind"] == "rt2" and meta["input"]["size"] == 32
    assert meta["graph"]["inputs"][0]["name"] == "images"
    assert meta["metrics"]["source"]["classifier.test_acc_tta_flip"] == 0.1
    assert meta["metrics"]["export"]["n"] == VERIFY_N
    assert {"torch", "onnxruntime"} <= set(meta["versions"])
    assert labels["project"] == "atop-serve" and labels["formats"] == "onnx" and labels["verified"] == "true"
    for f, rec in meta["files"].items():
        assert modelio.sha256(Path(ref.path) / f) == rec["sha256"]
    assert (Path(ref.path) / modelio.CARD).read_bytes() == (exported["out"] / modelio.CARD).read_bytes()
    out = _session(Path(ref.path) / modelio.ONNX_FILE).run(["probs"], _feed(Path(ref.path), 3))[0]
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
    assert bentoml.models.get("atop-test:latest").tag == ref.tag


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    import atop_cli

    monkeypatch.setattr(sys, "argv", ["atop", *args])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_cli_list(exported, bento_home, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "export", "--list")
    assert code == 0 and exported["summary"]["tag"] in out and "MB" in out and "verify max|diff|" in out


def test_cli_help(monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "export", "--help")
    assert code == 0 and "--format" in out and "--verify-n" in out and "--list" in out


# ------------------------------------------------------------------------------------------------- errors
def _tensorrt_here() -> bool:
    from export.tensorrt import unavailable_reason

    return unavailable_reason() is None


def _corrupt(kind: str, tmp_path: Path, model_dir: Path) -> list[str]:
    import shutil

    folder = tmp_path / "model"
    if kind == "missing":
        return ["--model", str(folder)]
    shutil.copytree(model_dir, folder)
    if kind == "corrupt-card":
        (folder / modelio.CARD).write_text("{not json")
    elif kind == "corrupt-weights":
        (folder / modelio.PURIFIER_FILE).write_bytes(b"\x00" * 64)
    elif kind == "corrupt-weights-no-checksum":
        card = modelio.read_card(folder)
        del card["purifier"]["sha256"]
        modelio.write_card(folder, card)
        (folder / modelio.PURIFIER_FILE).write_bytes(b"\x00" * 64)
    elif kind == "bad-rt":
        card = modelio.read_card(folder)
        card["purifier"]["rt"]["kind"] = "rt9"
        modelio.write_card(folder, card)
    return ["--model", str(folder)]


@pytest.mark.parametrize("kind,extra,message", [
    ("missing", [], "does not exist"),
    ("corrupt-card", [], "corrupt model card"),
    ("corrupt-weights", [], "corrupt model folder"),
    ("corrupt-weights-no-checksum", [], "corrupt weights file"),
    ("bad-rt", [], "corrupt model card"),
    ("ok", ["--format", "onnnx"], "unknown export format"),
    ("ok", ["--format", "tensorrt"], "needs TensorRT"),
    ("ok", ["--variants", "int8,int9"], "unknown candidate(s) int9"),
    ("ok", ["--variants", " , "], "--variants: no candidate named"),
])
def test_cli_errors(kind, extra, message, model_dir, tmp_path, monkeypatch, capsys):
    if "tensorrt" in extra and _tensorrt_here():
        pytest.skip("this machine can run TensorRT: no error to test")
    out = tmp_path / "out" / "serving"
    code, _, err = _cli(monkeypatch, capsys, "export", *_corrupt(kind, tmp_path, model_dir), *extra, "--out", str(out),
                        "--no-register", "--verify-n", "10", "--no-optimize")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- TensorRT
def test_tensorrt_export(model_dir, tmp_path):
    from export.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT export not testable here: {reason}")
    from export.build import export_model

    out = tmp_path / "serving"
    export_model(model_dir, out, fmt="tensorrt", register=False, verify_n=VERIFY_N, optimize=False, log=lambda m: None)
    card = modelio.read_card(out)
    assert (out / modelio.TRT_FILE).exists() and (out / modelio.ONNX_FILE).exists()
    assert card["export"]["verification"]["tensorrt"]["passed"]


def test_pack_half_weights_and_tta_override(tmp_path):
    from atop_serve import modelio
    from atop_serve.errors import AtopError
    from export.pack import pack

    src = make_model_folder(tmp_path / "src", tta="flip-translate")
    card = pack(src, tmp_path / "packed", half=True, tta="none", samples=3, mirror=True, rate=0.1)
    assert card["classifier"]["tta"] == "none" and card["classifier"]["weights_dtype"] == "float16"
    pipe = modelio.load_pipeline(tmp_path / "packed")
    assert pipe.classifier.mode == "none" and pipe.samples == 3 and modelio.load_pipeline(src).samples == 1
    assert pipe.mirror and not modelio.load_pipeline(src).mirror
    assert pipe.transform.rate == 0.1 and modelio.load_pipeline(src).transform.rate == 0.25
    assert modelio.load_pipeline(tmp_path / "packed", samples=2).samples == 2
    assert modelio.read_card(src)["classifier"]["tta"] == "flip-translate"  # the source is untouched
    with pytest.raises(AtopError, match="unknown --tta"):
        pack(src, tmp_path / "bad", tta="rotate")
    with pytest.raises(AtopError, match="--rate: rate must be in"):
        pack(src, tmp_path / "bad", rate=1.5)
    assert not (tmp_path / "bad").exists()


def test_pack_swaps_in_another_classifier(tmp_path):
    """``--classifier``: the packed folder runs the source's purifier with the other folder's classifier (its
    weights and card section), records the swap, and drops evaluations that measured the replaced pipeline;
    mismatched classes or a folder without a classifier fail before anything is written."""
    import torch

    from atop_serve import modelio
    from atop_serve.errors import AtopError
    from export.pack import pack

    src = make_model_folder(tmp_path / "src", seed=0, tta="none")
    card = modelio.read_card(src)
    card["evaluation"] = {"old": {"accuracy": {"clean": {"value": 0.5}}}}
    card["purifier"]["metrics"] = {"atop_clean_acc_k1": {"value": 0.5}}
    modelio.write_card(src, card)
    other = make_model_folder(tmp_path / "other", seed=1, tta="flip")
    packed = pack(src, tmp_path / "packed", half=False, classifier=other)
    swap = packed["pipeline"]["classifier_swap"]
    assert swap["replaced"]["sha256"] == card["classifier"]["sha256"] and swap["classifier_from"] == str(other)
    assert swap["purifier_metrics_then"] == {"atop_clean_acc_k1": {"value": 0.5}}
    assert "evaluation" not in packed and "metrics" not in packed["purifier"]
    assert packed["classifier"]["tta"] == "flip"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        got = modelio.load_pipeline(tmp_path / "packed")
        assert torch.equal(got.classifier(x), modelio.load_classifier(other)(x))
        mine = modelio.load_pipeline(src).purifier.state_dict()
        assert all(torch.equal(v, mine[k]) for k, v in got.purifier.state_dict().items())
    wrong = make_model_folder(tmp_path / "wrong", seed=2)
    wc = modelio.read_card(wrong)
    wc["classes"] = [f"c{i}" for i in range(10)]
    modelio.write_card(wrong, wc)
    with pytest.raises(AtopError, match="has classes"):
        pack(src, tmp_path / "bad", classifier=wrong)
    with pytest.raises(AtopError, match="does not exist|not found|no card"):
        pack(src, tmp_path / "bad", classifier=tmp_path / "nowhere")
    assert not (tmp_path / "bad").exists()


def test_int8_full_quantises_the_purifier_glue(model_dir, tmp_path):
    """``int8-full`` runs a gated-unet-lrelu purifier's gates on uint8 once ONNX Runtime has fused the QDQ pairs
    (LeakyReLU and sigmoid become table lookups), except the last gated layer, which feeds the fp32 output
    convolution; plain ``int8`` keeps every gate in float."""
    import logging

    import onnx
    import onnxruntime as ort

    from export import optimize, verify
    from export.onnx_export import export_onnx
    from training.purifier import carry_weights

    pipe = modelio.load_pipeline(model_dir)
    pipe.purifier = carry_weights(pipe.purifier, "gated-unet-lrelu")
    src = export_onnx(pipe, tmp_path / "pipeline.onnx")
    calib = verify.load_images(16, None, "train", 0)
    assert len(optimize.nodes_of(src, ("LeakyRelu",), scope="pipeline.purifier")) == 8
    ops = {}
    logging.getLogger().setLevel(logging.ERROR)
    for name, recipe in optimize.INT8_RECIPES.items():
        q = optimize.build_int8(src, tmp_path / f"{name}.onnx", calib.images, pipe.transform, recipe)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        ops[name] = [n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node]
    assert ops["int8"].count("LeakyRelu") == 8 and "QLinearLeakyRelu" not in ops["int8"]
    assert ops["int8-full"].count("LeakyRelu") == 1 and ops["int8-full"].count("QLinearLeakyRelu") == 7
    assert ops["int8-full"].count("QLinearSigmoid") == 7 and ops["int8-full"].count("QLinearMul") == 7
    # int8-full-in: the purifier's input convolution on int8 too; its output convolution stays fp32
    weight_of = {n.name: n.input[1] for n in onnx.load(str(src), load_external_data=False).graph.node
                 if n.op_type in ("Conv", "Gemm", "MatMul")}
    kept = {weight_of[n].split(".", 1)[1].removesuffix(".weight")
            for n in optimize.kept_fp32(src, optimize.INT8_RECIPES["int8-full-in"])}
    assert kept == {"purifier.out", "classifier.classifier.whiten", "classifier.classifier.head"}
    assert ops["int8-full-in"].count("QLinearConv") == ops["int8-full"].count("QLinearConv") + 1
    # int8-full-gate: the last gated layer's gating on uint8 too; the output convolution and sigmoid stay fp32
    assert "LeakyRelu" not in ops["int8-full-gate"] and ops["int8-full-gate"].count("QLinearLeakyRelu") == 8
    assert ops["int8-full-gate"].count("QLinearMul") == ops["int8-full-in"].count("QLinearMul") + 1
    assert ops["int8-full-gate"].count("QLinearConv") == ops["int8-full-in"].count("QLinearConv")
    assert optimize.kept_fp32(src, optimize.INT8_RECIPES["int8-full-gate"]) == optimize.kept_fp32(
        src, optimize.INT8_RECIPES["int8-full-in"])


def test_int8_weights_have_seven_bits(exported, pipeline, tmp_path):
    """Every int8 weight of an int8 variant lies in [-64, 64] (7 bits), so no pair of uint8 x int8 products can
    reach 32,768 and ONNX Runtime's 16-bit pair sums on CPUs without VNNI are exact (atop_serve/cpu.py); weights
    span that range (per-channel scales use it), and the card records it."""
    import logging

    import onnx
    from onnx import numpy_helper

    from export import optimize, verify

    logging.getLogger().setLevel(logging.ERROR)
    calib = verify.load_images(16, None, "train", 0)
    src = exported["out"] / modelio.ONNX_FILE
    q = optimize.build_int8(src, tmp_path / "int8.onnx", calib.images, pipeline.transform,
                           optimize.INT8_RECIPES["int8"])
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(q)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(abs(w.astype(np.int32)).max()) for w in weights) == 64
    assert 2 * 255 * 64 < 2**15
    assert optimize.int8_weight_bits(q) == optimize.WEIGHT_BITS == 7 and optimize.int8_weight_bits(src) is None
    cpu_variant = exported["card"]["export"]["cpu_variant"]
    assert cpu_variant.get("weight_bits") == (7 if cpu_variant["shipped"] in optimize.INT8_RECIPES else None)


@pytest.mark.parametrize("what", ["folder", "file"])
def test_pack_refuses_an_out_that_is_not_a_model_folder(tmp_path, what):
    """pack replaces --out as a whole: a folder without card.json (someone's files) was deleted, a file was a
    NotADirectoryError traceback; both are now refused before anything is written."""
    from atop_serve.errors import AtopError
    from export.pack import pack

    src = make_model_folder(tmp_path / "src")
    out = tmp_path / "out"
    if what == "folder":
        out.mkdir()
        (out / "thesis.txt").write_text("keep")
    else:
        out.write_text("keep")
    with pytest.raises(AtopError, match="not a model folder"):
        pack(src, out)
    assert (out / "thesis.txt" if what == "folder" else out).read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folder left
