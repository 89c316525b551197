"""Robustness evaluation: attacks, threat models, resumable report folders, sanity checks, CLI errors.

Fast (CPU, tiny n): a linear classifier trained here on synthetic 8x8 images, random-weight model folders,
and a 40-image PNG dataset written to a temporary folder (the real CIFAR-10 copy is never needed)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from atop_serve.errors import AtopError
from training.attacks import APGD, EOT, FAB, FGSM, PGD, AutoAttack, Square, StAdv
from training.data import Dataset
from training.evaluate import EvalConfig, Models, parse_attack, parse_eps_list, run_eval

from .conftest import make_model_folder

CLASSES = [f"c{i}" for i in range(10)]


# ------------------------------------------------------------------------------------------------ fixtures
def _synthetic(n=80, seed=0):
    """uint8 images (n, 3, 8, 8): per-class means close together, so small budgets matter."""
    g = torch.Generator().manual_seed(seed)
    means = 128 + 4 * torch.randn(10, 3, 8, 8, generator=g)
    y = torch.arange(n) % 10
    x = (means[y] + 5 * torch.randn(n, 3, 8, 8, generator=g)).round().clamp(0, 255).to(torch.uint8)
    return Dataset(x, y, CLASSES, "synthetic")


class Linear(nn.Module):
    def __init__(self, masked=False):
        super().__init__()
        self.lin, self.masked = nn.Linear(192, 10), masked

    def forward(self, x):
        if self.masked:  # same predictions, zero input gradient: an obviously masked model
            return self.lin(x.detach().flatten(1)) + 0 * x.flatten(1).sum(1, keepdim=True)
        return self.lin(x.flatten(1))


@pytest.fixture(scope="module")
def data():
    return _synthetic()


@pytest.fixture(scope="module")
def linear(data):
    torch.manual_seed(0)
    m = Linear()
    x, y = data.images.float() / 255, data.labels
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def png_data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("pngdata")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        d = root / "test" / c
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOP_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def _acc(m, x, y):
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


# ------------------------------------------------------------------------------------------------- attacks
def _attacks(m, eps, g):
    return [FGSM(m, eps), PGD(m, eps, eps / 4, 5, generator=g), PGD(m, eps, eps / 4, 3, restarts=2, generator=g),
            APGD(m, eps, 10, "ce", generator=g), APGD(m, eps, 10, "dlr", generator=g),
            APGD(m, eps, 5, "dlr-targeted", n_target_classes=2, generator=g), Square(m, eps, 50, generator=g),
            FAB(m, eps, 10, n_target_classes=2, generator=g),
            AutoAttack(m, eps, "standard", steps=5, queries=20, n_target_classes=2, generator=g),
            AutoAttack(m, eps, "rand", steps=5, generator=g, eot_iter=2)]


def test_attacks_keep_eps_ball_and_range(linear, data):
    x, y = data.images.float() / 255, data.labels
    g = torch.Generator().manual_seed(0)
    eps = 4 / 255
    for attack in _attacks(linear, eps, g):
        adv = attack(x, y)
        assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1, attack.name
        assert (adv - x).abs().max() <= eps + 1e-6, attack.name
    adv = PGD(linear, 0.5, 0.1, 5, norm="l2", generator=g)(x, y)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and 0 <= adv.min() and adv.max() <= 1
    adv = StAdv(linear, budget=0.05, steps=3, generator=g)(x, y)
    assert adv.shape == x.shape and 0 <= adv.min() and adv.max() <= 1
    assert linear.training is False


def test_gradient_attacks_lower_accuracy_of_trained_model(linear, data):
    x, y = data.images.float() / 255, data.labels
    clean = _acc(linear, x, y)
    assert clean > 0.9
    g = torch.Generator().manual_seed(0)
    for attack in (FGSM(linear, 4 / 255), PGD(linear, 4 / 255, 1 / 255, 10, generator=g),
                   APGD(linear, 4 / 255, 20, "dlr", generator=g), FAB(linear, 4 / 255, 20, n_target_classes=3)):
        assert _acc(linear, attack(x, y), y) < clean - 0.3, attack.name


def test_fab_finds_minimal_linf_point_of_linear_model():
    """For an affine 2-class model the closest l_inf boundary point is known in closed form (inside the box):
    FAB's reported point must be adversarial and within a few percent of that distance, and an eps below it
    must leave the image unchanged."""
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x = torch.full((1, 3, 2, 2), 0.5)
    with torch.no_grad():
        z, y = lin(x)[0], lin(x).argmax(1)
        w = lin[1].weight[1 - y] - lin[1].weight[y]
        dist = ((z[y] - z[1 - y]) / w.abs().sum()).item()  # minimal l_inf move to the boundary (unconstrained by the box here)
    assert dist < 0.5
    adv = FAB(lin, eps=1.5 * dist, steps=20, n_target_classes=1)(x, y)
    assert lin(adv).argmax(1) != y
    assert (adv - x).abs().max().item() <= dist * 1.06 + 1e-6
    same = FAB(lin, eps=0.9 * dist, steps=20, n_target_classes=1)(x, y)
    assert torch.equal(same, x)


def test_project_linf_meets_the_hyperplane_in_the_box():
    from training.attacks.fab import project_linf

    g = torch.Generator().manual_seed(0)
    p, w = torch.rand(5, 30, generator=g), torch.randn(5, 30, generator=g)
    r = torch.randn(5, generator=g)
    d = project_linf(p, w, r, iters=40)
    assert torch.allclose((w * d).sum(1), r, atol=1e-4)
    assert ((p + d) >= -1e-6).all() and ((p + d) <= 1 + 1e-6).all()


def test_attacks_restore_every_submodule_mode(data):
    """A wrapper made on the fly is in train mode while the model inside is in eval mode: after an attack both
    must be as they were (pushing the wrapper's mode down would leave batch norms in train mode)."""
    inner = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)).eval()
    wrapper = nn.Sequential(inner)
    assert wrapper.training and not inner.training
    x, y = data.images[:16].float() / 255, data.labels[:16]
    stats = inner[2].running_mean.clone()
    for attack in (FGSM(wrapper, 4 / 255), PGD(wrapper, 4 / 255, 1 / 255, 2), FAB(wrapper, 4 / 255, 2, 1)):
        attack(x, y)
        assert wrapper.training and not any(m.training for m in inner.modules()), attack.name
    assert torch.equal(stats, inner[2].running_mean)


def test_attacks_reproducible_with_generators(linear, data):
    x, y = data.images[:20].float() / 255, data.labels[:20]
    runs = [PGD(linear, 4 / 255, 1 / 255, 3, generator=torch.Generator().manual_seed(5))(x, y) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # in chunks: one generator stream, so chunk by chunk it equals a call per chunk in turn
    g = torch.Generator().manual_seed(5)
    chunks = [PGD(linear, 4 / 255, 1 / 255, 3, generator=g)(x[i:i + 8], y[i:i + 8]) for i in range(0, 20, 8)]
    batched = PGD(linear, 4 / 255, 1 / 255, 3, generator=torch.Generator().manual_seed(5)).batched(x, y, 8)
    assert batched.shape == x.shape and torch.equal(batched, torch.cat(chunks))
    eot = EOT(linear, 3)
    assert torch.allclose(eot(x), linear(x), atol=1e-6)


def test_attack_spec_parsing():
    cfg = EvalConfig(threat="pipeline", eot=4)
    s = parse_attack("pgd-20@eps=4/255@restarts=3", cfg)
    assert s.family == "pgd" and s.params["steps"] == 20 and s.params["restarts"] == 3
    assert s.params["eps"] == pytest.approx(4 / 255) and s.params["alpha"] == pytest.approx(1 / 255)
    assert s.params["eot"] == 4
    assert parse_attack("autoattack-rand", cfg).params["eot"] == 20
    assert parse_attack("apgd-ce", EvalConfig(threat="classifier")).params["eot"] == 1
    assert parse_attack("stadv", cfg).params["budget"] == 0.05
    assert parse_attack("fab-t@targets=3", cfg).params["targets"] == 3
    assert "fab-t" in parse_attack("autoattack", cfg).params["components"]
    assert parse_eps_list("0,2,4,8,16/255") == pytest.approx((0, 2 / 255, 4 / 255, 8 / 255, 16 / 255))
    assert parse_eps_list("0,0.5,8/255") == pytest.approx((0, 0.5, 8 / 255))
    for bad in ("pgd", "pgdx-3", "fgsm@steps=3", "pgd-3@eps=2", "square@queries"):
        with pytest.raises(AtopError):
            parse_attack(bad, cfg)


# --------------------------------------------------------------------------------------- sanity checks
def _sanity_run(model, data, tmp_path):
    cfg = EvalConfig(threat="bare", attacks=("clean", "fgsm"), n=len(data), batch_size=len(data), sanity=True,
                     sweep_attack="pgd-5", eps_sweep=(0, 2 / 255, 4 / 255), sanity_queries=300, bf16=False,
                     device="cpu", grid=0)
    return run_eval(Models(model, None, name="linear", fingerprint={"m": id(model)}), data, cfg, None, False)


def test_sanity_checks_pass_on_honest_model(linear, data, tmp_path):
    checks = {c["check"]: c for c in _sanity_run(linear, data, tmp_path)["sanity"]}
    assert all(c["passed"] for c in checks.values()), checks


def test_sanity_checks_flag_masked_model(linear, data, tmp_path):
    masked = Linear(masked=True)
    masked.load_state_dict(linear.state_dict())
    checks = {c["check"]: c for c in _sanity_run(masked.eval(), data, tmp_path)["sanity"]}
    assert not checks["unbounded attack reaches ~0 %"]["passed"]
    assert not checks["black-box Square not stronger than gradient attacks"]["passed"]


# ------------------------------------------------------------------------------ report folder and resume
def _cli(monkeypatch, capsys, *args):
    import atop_cli

    monkeypatch.setattr(sys, "argv", ["atop", *args])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_report_folder_and_resume(tmp_path, png_data, monkeypatch, capsys):
    model = make_model_folder(tmp_path / "model", tta="none")
    out = tmp_path / "report"
    args = ["eval", "--model", str(model), "--threat", "pipeline", "--attacks", "clean,fgsm,pgd-1", "--eot", "2",
            "--n", "10", "--batch-size", "10", "--data", str(png_data), "--out", str(out), "--no-progress",
            "--eps-sweep", "0,8/255", "--sweep-attack", "pgd-1", "--device", "cpu"]
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    for f in ("report.json", "report.md", "robust_vs_eps.png", "examples.png", "attacks/pgd-1.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["threat"] == "pipeline" and rep["n"] == 10 and rep["seed"] == 0 and rep["machine"]["device"]
    r = rep["results"]["pgd-1"]
    assert r["params"]["eps"] == pytest.approx(8 / 255) and r["params"]["eot"] == 2 and len(r["ci95"]) == 2
    assert not r["resumed"] and "| pgd-1 |" in (out / "report.md").read_text()
    mtime = (out / "attacks" / "pgd-1.json").stat().st_mtime_ns

    # a rerun (here with one more attack) reuses the finished attacks and computes only the new one
    code, stdout, err = _cli(monkeypatch, capsys, *[a if a != "clean,fgsm,pgd-1" else "clean,fgsm,pgd-1,square@queries=3"
                                                    for a in args])
    assert code in (0, None), err
    rep = json.loads((out / "report.json").read_text())
    assert rep["results"]["pgd-1"]["resumed"] and rep["results"]["clean"]["resumed"]
    assert not rep["results"]["square@queries=3"]["resumed"]
    assert (out / "attacks" / "pgd-1.json").stat().st_mtime_ns == mtime

    # a different configuration (seed) is recomputed, never reused
    code, _, err = _cli(monkeypatch, capsys, *args, "--seed", "1")
    rep = json.loads((out / "report.json").read_text())
    assert not rep["results"]["pgd-1"]["resumed"]

    # K = 3 at prediction, attacked through single purifications: a different run, K recorded in the report
    code, _, err = _cli(monkeypatch, capsys, *args, "--seed", "1", "--samples", "3", "--attack-samples", "1")
    assert code in (0, None), err
    rep = json.loads((out / "report.json").read_text())
    assert not rep["results"]["pgd-1"]["resumed"] and rep["samples"] == 3 and rep["config"]["attack_samples"] == 1
    assert "K = 3" in (out / "report.md").read_text()


def _preset(monkeypatch, capsys, preset, models, attacks, png_data, out, *extra):
    """Run ``atop eval --preset`` on 10 images of the PNG dataset; fails the test on a non-zero exit."""
    code, stdout, err = _cli(monkeypatch, capsys, "eval", "--preset", preset, "--model", models, "--attacks", attacks,
                             "--n", "10", "--data", str(png_data), "--out", str(out), "--no-progress", "--device",
                             "cpu", *extra)
    assert code in (0, None), err
    return stdout


def test_transfer_threat_and_table7(tmp_path, png_data, monkeypatch, capsys):
    model = make_model_folder(tmp_path / "model", tta="none")
    source = make_model_folder(tmp_path / "source", seed=1, tta="none")
    out = tmp_path / "transfer"
    code, _, err = _cli(monkeypatch, capsys, "eval", "--model", str(model), "--threat", "transfer", "--source",
                        str(source), "--attacks", "clean,pgd-1", "--n", "10", "--data", str(png_data), "--out",
                        str(out), "--no-progress", "--device", "cpu")
    assert code in (0, None), err
    rep = json.loads((out / "report.json").read_text())
    assert rep["threat"] == "transfer" and rep["source"] == str(source)

    _preset(monkeypatch, capsys, "table7", f"{model},{source}", "clean,fgsm", png_data, tmp_path / "t7")
    table = (tmp_path / "t7" / "table7.md").read_text()
    assert "| model | RT | clean | fgsm |" in table and "| source | rt2 |" in table

    # rows sharing a classifier (one folder, two RT kinds) craft each attack once and purify it per row
    _preset(monkeypatch, capsys, "table7", str(model), "clean,pgd-2", png_data, tmp_path / "t7b", "--rt", "rt1,rt2")
    first = json.loads((tmp_path / "t7b" / "model-rt1" / "report.json").read_text())["results"]["pgd-2"]
    second = json.loads((tmp_path / "t7b" / "model-rt2" / "report.json").read_text())["results"]["pgd-2"]
    assert "examples_reused" not in first and second["examples_reused"] == 10


def test_table1_bare_and_purified_rows_share_examples(tmp_path, png_data, monkeypatch, capsys):
    import shutil

    from atop_serve import modelio

    model = make_model_folder(tmp_path / "atop", tta="none")
    clf = shutil.copytree(model, tmp_path / "vanilla")
    card = modelio.read_card(clf)
    del card["purifier"]
    modelio.write_card(clf, card)
    (clf / "purifier.safetensors").unlink(missing_ok=True)
    _preset(monkeypatch, capsys, "table1", f"{clf},{model}", "clean,fgsm,pgd-l2-2", png_data, tmp_path / "t1")
    table = (tmp_path / "t1" / "table1.md").read_text()
    assert "| vanilla | bare |" in table and "| atop | classifier |" in table
    bare = json.loads((tmp_path / "t1" / "vanilla" / "report.json").read_text())
    purified = json.loads((tmp_path / "t1" / "atop" / "report.json").read_text())
    assert bare["threat"] == "bare" and purified["threat"] == "classifier"
    assert purified["results"]["pgd-l2-2"].get("examples_reused") == 10


def test_rate_sweep_overrides_rt_and_crafts_once(tmp_path, png_data, monkeypatch, capsys):
    model = make_model_folder(tmp_path / "model", tta="none")
    out = tmp_path / "rates"
    code, _, err = _cli(monkeypatch, capsys, "sweep-rate", "--model", str(model), "--rates", "0,0.5", "--attacks",
                        "clean,pgd-2", "--n", "10", "--samples", "2", "--data", str(png_data), "--out", str(out),
                        "--no-progress")
    assert code in (0, None), err
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["param"] == "rate" and [r["rate"] for r in sweep["rows"]] == [0, 0.5] and sweep["samples"] == 2
    assert (out / "sweep.png").is_file() and "| rate | clean | pgd-2 |" in (out / "sweep.md").read_text()
    reports = [json.loads((out / f"rate-{v}" / "report.json").read_text()) for v in ("0", "0.5")]
    assert [r["rt"]["rate"] for r in reports] == [0, 0.5]
    assert [r["rt"]["sigma"] for r in reports] == [0.1, 0.1]  # the model's other RT settings are kept
    assert "examples_reused" not in reports[0]["results"]["pgd-2"]
    assert reports[1]["results"]["pgd-2"]["examples_reused"] == 10  # crafted on f once, purified per point
    code, _, err = _cli(monkeypatch, capsys, "sweep-rate", "--model", str(model), "--rates", "1.5", "--n", "10",
                        "--data", str(png_data), "--out", str(tmp_path / "bad"), "--no-progress")
    assert code == 2 and "rate must be in [0, 1)" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,msg", [
    (["--attacks", "pgdx"], "unknown attack"),
    (["--threat", "nope"], "unknown threat"),
    (["--threat", "transfer"], "needs --source"),
    (["--model", "/nonexistent/folder"], "does not exist"),
    (["--eps", "eight"], "not a number"),
    (["--preset", "table9", "--out", "x"], "unknown --preset"),
    (["--tta", "sideways"], "unknown --tta"),  # was a ValueError traceback
    (["--eot", "0", "--threat", "pipeline", "--attacks", "fgsm"], "eot must be at least 1"),  # was a traceback
    (["--restarts", "0", "--attacks", "pgd-2"], "restarts must be at least 1"),  # was a traceback
    (["--attacks", "pgd-l2-5@eps=nan"], "finite"),  # was accepted
    (["--sigma", "nan"], "--sigma"),  # was accepted: a report at sigma nan
    (["--attacks", ","], "names no attack"),  # was an empty report that looked complete
])
def test_bad_arguments_exit_2_with_one_line(args, msg, monkeypatch, capsys, tmp_path):
    model = make_model_folder(tmp_path / "model") if "--model" not in args else None
    base = ["eval", "--no-progress"] + (["--model", str(model)] if model else [])
    code, _, err = _cli(monkeypatch, capsys, *base, *args)
    assert code == 2
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_record_writes_measured_reports_into_the_card(tmp_path, png_data, monkeypatch, capsys):
    """`atop record`: a report of these weights becomes a card entry; other weights, a changed card or a report
    without a fingerprint are refused (exit 2, card unchanged); recording keeps the fingerprint, so a copy of the
    folder resumes the same evaluation."""
    import shutil

    from atop_serve import modelio
    from training.evaluate import folder_fingerprint

    model = make_model_folder(tmp_path / "model", tta="none")
    out = tmp_path / "reports" / "r-clean"
    args = ["eval", "--model", str(model), "--attacks", "clean,fgsm", "--n", "10", "--data", str(png_data),
            "--out", str(out), "--no-progress", "--device", "cpu"]
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    rep = json.loads((out / "report.json").read_text())
    before = folder_fingerprint(model)
    assert rep["fingerprint"]["model"] == before and set(before["weights"]) == {modelio.CLASSIFIER_FILE,
                                                                                modelio.PURIFIER_FILE}

    code, stdout, err = _cli(monkeypatch, capsys, "record", str(out), "--model", str(model), "--note", "a test")
    assert code in (0, None), err
    assert json.loads(stdout)["entries"][0]["name"] == "r-clean"
    card = modelio.read_card(model)
    entry = card["evaluation"]["r-clean"]
    assert entry["accuracy"]["fgsm"]["value"] == rep["results"]["fgsm"]["accuracy"]
    assert entry["accuracy"]["clean"]["ci95"] == rep["results"]["clean"]["ci95"]
    assert entry["command"].startswith("atop eval --model") and entry["threat"] == "classifier" and entry["n"] == 10
    assert entry["samples"] == rep["samples"] and entry["note"] == "a test" and entry["attack_gradients"] == "fp32"
    assert entry["machine"].startswith(rep["machine"]["device"]) and entry["report"].endswith("report.json")
    assert folder_fingerprint(model) == before  # records are not part of what was measured
    # `atop eval --record` does the same in one command, replacing the entry (here: a resumed run, recorded under the folder's name)
    code, _, err = _cli(monkeypatch, capsys, *args, "--record")
    assert code in (0, None) and "recorded" in err and "r-clean" in modelio.read_card(model)["evaluation"], err
    assert "note" not in modelio.read_card(model)["evaluation"]["r-clean"]

    # a copy of the folder is the same model: its evaluation resumes every attack, and its card takes the report
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    code, _, err = _cli(monkeypatch, capsys, *[str(copy) if a == str(model) else a for a in args])
    assert code in (0, None), err
    assert all(r["resumed"] for r in json.loads((out / "report.json").read_text())["results"].values())

    # other weights: refused, card unchanged
    other = make_model_folder(tmp_path / "other", seed=1, tta="none")
    card_bytes = (other / modelio.CARD).read_bytes()
    code, _, err = _cli(monkeypatch, capsys, "record", str(out), "--model", str(other))
    assert code == 2 and "did not measure the weights" in err and len(err.strip().splitlines()) == 1, err
    assert (other / modelio.CARD).read_bytes() == card_bytes

    # the same weights, but the card now prescribes another test-time augmentation
    card = modelio.read_card(copy)
    card["classifier"]["tta"] = "flip"
    modelio.write_card(copy, card)
    code, _, err = _cli(monkeypatch, capsys, "record", str(out), "--model", str(copy))
    assert code == 2 and "another configuration" in err, err

    # a report made before fingerprints existed, a folder that is no report, two reports under one --name
    rep.pop("fingerprint")
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(rep))
    for bad, msg in (([str(old)], "no model fingerprint"), ([str(tmp_path)], "report.json is missing"),
                     ([str(out), str(out), "--name", "x"], "--name names one entry"),
                     (["--out"], "--record writes")):
        if bad == ["--out"]:  # `atop eval --record` without --out
            code, _, err = _cli(monkeypatch, capsys, "eval", "--model", str(model), "--record", "--no-progress")
            assert code == 2 and "--record writes" in err, err
            continue
        code, _, err = _cli(monkeypatch, capsys, "record", *bad, "--model", str(model))
        assert code == 2 and msg in err, (bad, err)
    (old / "report.json").write_text("{not json")
    code, _, err = _cli(monkeypatch, capsys, "record", str(old), "--model", str(model))
    assert code == 2 and "corrupt report" in err, err


def test_fewer_images_than_classes_is_a_clear_error(tmp_path, png_data, monkeypatch, capsys):
    """--n below the number of classes selects no image of a class-balanced subset (was: a torch.cat traceback)."""
    model = make_model_folder(tmp_path / "model")
    code, _, err = _cli(monkeypatch, capsys, "eval", "--model", str(model), "--n", "5", "--attacks", "clean",
                        "--data", str(png_data), "--no-progress")
    assert code == 2 and "at least 10" in err and "Traceback" not in err, err


def test_sweep_checks_every_point_before_the_first_run(tmp_path, png_data, monkeypatch, capsys):
    """A bad value late in --rates fails before any point is evaluated or the output folder is made."""
    model = make_model_folder(tmp_path / "model")
    code, _, err = _cli(monkeypatch, capsys, "sweep-rate", "--model", str(model), "--rates", "0,0.1,1", "--n", "10",
                        "--attacks", "clean", "--data", str(png_data), "--out", str(tmp_path / "sweep"), "--no-progress")
    assert code == 2 and "--rate must be in [0, 1)" in err, err
    assert not (tmp_path / "sweep").exists()
