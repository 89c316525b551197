"""Training: a short run learns, resume is bit-identical, two-process DDP keeps ranks identical,
AToP updates only the purifier."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atop_serve import load_pipeline, modelio

from .conftest import DATA_ROOT, make_model_folder, needs_data

pytestmark = needs_data()
REPO = Path(__file__).resolve().parents[1]


def _train(out, **kw):
    from training.classifier import ClassifierConfig, train

    cfg = ClassifierConfig(**{"limit": 2000, "eval_n": 500, "epochs": 3, "batch_size": 200, "data": str(DATA_ROOT), **kw})
    return train(cfg, out, resume=kw.pop("resume", False) if "resume" in kw else False, show_progress=False)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One standard 3-epoch run on 2,000 images, shared by the tests that need a trained standard classifier (its
    folder is read-only to them: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("short") / "clf"
    return {"out": out, **_train(out, epochs=3)}


def test_short_classifier_run_beats_chance(short_run):
    card = modelio.read_card(short_run["out"])
    assert short_run["metrics"]["test_acc_tta_none"] > 0.30  # chance is 0.10
    assert card["classifier"]["metrics"]["test_acc_tta_flip"] > 0.30
    clf = modelio.load_classifier(short_run["out"])
    assert clf.mode == "flip-translate" and not clf.training


def test_resume_reproduces_uninterrupted_weights(tmp_path):
    from training.classifier import ClassifierConfig, train

    # 4 steps per epoch: the schedule, the momentum and a Lookahead update (every 5th step) all cross the resume
    base = {"limit": 500, "eval_n": 100, "epochs": 2, "batch_size": 125, "data": str(DATA_ROOT)}
    train(ClassifierConfig(**base), tmp_path / "a", show_progress=False)
    train(ClassifierConfig(**base, stop_after=1), tmp_path / "b", show_progress=False)
    assert not (tmp_path / "b" / modelio.CLASSIFIER_FILE).exists()  # stopped before the end
    train(ClassifierConfig(**base), tmp_path / "b", resume=True, show_progress=False)
    a, b = (load_file(str(tmp_path / d / modelio.CLASSIFIER_FILE)) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adversarial_training_buys_robustness(tmp_path, short_run):
    """N-FGSM adversarial training on a small subset ends with PGD-10 accuracy (against itself) well above the
    standard run's (same data and batches, fewer epochs), records it in the card, and learns its first conv instead of
    freezing a whitening one."""
    from training.classifier import pgd_accuracy

    std = short_run
    at = _train(tmp_path / "at", limit=2000, eval_n=200, epochs=2, batch_size=200, tta="none", adversarial="n-fgsm")
    card = modelio.read_card(tmp_path / "at")["classifier"]["metrics"]
    assert card["pgd10_images"] == 200 and 0 <= card["test_acc_pgd10_tta_none"] <= 1
    from training.data import load_cifar10

    _, test = load_cifar10(str(DATA_ROOT))
    sub = test.balanced_subset(200)
    std_rob = pgd_accuracy(std["model"], sub, 8 / 255, 10)
    print(f"PGD-10: AT {card['test_acc_pgd10_tta_none']:.3f}, standard {std_rob:.3f}; clean AT {card['test_acc_tta_none']:.3f}, "
          f"standard {std['metrics']['test_acc_tta_none']:.3f}")
    assert card["test_acc_pgd10_tta_none"] >= std_rob + 0.08, (card, std_rob)
    assert at["model"].whiten.weight.requires_grad and not std["model"].whiten.weight.requires_grad


def test_torchrun_two_processes_end_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",  # a free port
           "-m", "atop_cli", "train", "classifier", "--out", str(tmp_path / "ddp"), "--limit", "800",
           "--eval-n", "100", "--epochs", "2", "--batch-size", "200", "--no-progress", "--data", str(DATA_ROOT)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # the ranks' own errors first: torchrun's summary at the end names only their exit codes
    errors = [ln for ln in r.stderr.splitlines() if "Error" in ln or "terminate" in ln or "what()" in ln]
    assert r.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + r.stderr[-1500:]
    train_info = json.loads((tmp_path / "ddp" / "card.json").read_text())["classifier"]["training"]
    assert train_info["world_size"] == 2
    hashes = train_info["rank_weight_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_atop_step_changes_only_the_purifier(tmp_path):
    from training.purifier import PurifierConfig, train

    src = make_model_folder(tmp_path / "src")
    src_card = modelio.read_card(src)
    src_card["evaluation"] = {"default-classifier": {"accuracy": {"clean": {"value": 0.9}}}}  # of the source's weights
    modelio.write_card(src, src_card)
    clf_before = load_file(str(src / modelio.CLASSIFIER_FILE))
    pur_before = load_file(str(src / modelio.PURIFIER_FILE))
    cfg = PurifierConfig(mode="atop", epochs=1, limit=300, batch_size=100, eval_n=50, data=str(DATA_ROOT), lam=1.0)
    r = train(cfg, tmp_path / "out", src, show_progress=False)
    assert r["classifier_unchanged"]
    clf_after = load_file(str(tmp_path / "out" / modelio.CLASSIFIER_FILE))
    pur_after = load_file(str(tmp_path / "out" / modelio.PURIFIER_FILE))
    assert all(torch.equal(clf_before[k], clf_after[k]) for k in clf_before)
    assert any(not torch.equal(pur_before[k], pur_after[k]) for k in pur_before)
    card = modelio.read_card(tmp_path / "out")
    assert card["purifier"]["atop"]["classifier_unchanged"] is True
    assert (tmp_path / "out" / "grid_epoch001.png").exists()
    assert "atop_earlier" not in card["purifier"]
    assert "evaluation" not in card  # measured on the source's weights: not carried into the new folder

    # fine-tuning the fine-tuned folder again keeps the first stage's record
    cfg2 = PurifierConfig(mode="atop", epochs=1, limit=100, batch_size=100, eval_n=20, data=str(DATA_ROOT), lam=0.5)
    train(cfg2, tmp_path / "out2", tmp_path / "out", show_progress=False)
    pur = modelio.read_card(tmp_path / "out2")["purifier"]
    assert pur["atop_earlier"] == [card["purifier"]["atop"]] and pur["atop"]["config"]["lam"] == 0.5


def test_atop_after_a_classifier_swap_retires_the_swap_caveat(tmp_path):
    """``atop pack --classifier`` notes that g was fine-tuned against another classifier; an AToP stage against the
    swapped-in one makes that note untrue: the card drops it, and the stage records the swap and its classifier."""
    from export.pack import pack
    from training.purifier import PurifierConfig, train

    src = make_model_folder(tmp_path / "src", seed=0)
    other = make_model_folder(tmp_path / "other", seed=1)
    swapped = pack(src, tmp_path / "swapped", half=False, classifier=other)
    assert "classifier_swap" in swapped["pipeline"]
    cfg = PurifierConfig(mode="atop", epochs=1, limit=100, batch_size=100, eval_n=20, data=str(DATA_ROOT), lam=1.0)
    train(cfg, tmp_path / "out", tmp_path / "swapped", show_progress=False)
    card = modelio.read_card(tmp_path / "out")
    assert "classifier_swap" not in card.get("pipeline", {})
    stage = card["purifier"]["atop"]
    assert stage["after_classifier_swap"] == swapped["pipeline"]["classifier_swap"]
    assert stage["classifier"]["sha256"] == modelio.read_card(other)["classifier"]["sha256"] == card["classifier"]["sha256"]
    assert card["pipeline"] == {k: v for k, v in swapped["pipeline"].items() if k != "classifier_swap"}


def test_classification_loss_targets():
    from training.purifier import classification_loss

    torch.manual_seed(0)
    logits, y = torch.randn(6, 10), torch.tensor([0, 3, 9, 2, 2, 5])
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    assert torch.allclose(classification_loss(logits, y, one_hot), torch.nn.functional.cross_entropy(logits, y))
    soft = torch.softmax(torch.randn(6, 10), 1)
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(classification_loss(logits, y, soft), expected)
    assert not torch.allclose(classification_loss(logits, y, soft), classification_loss(logits, y))
    # minimised where f(g(.)) predicts what f predicted on the clean image, not the label
    assert classification_loss(soft.log(), y, soft) < classification_loss(soft.log() + 0.5 * one_hot, y, soft)


def test_cls_targets_per_kind():
    from training.purifier import cls_targets

    torch.manual_seed(0)
    clean_logits, y = torch.randn(6, 10), torch.tensor([0, 3, 9, 2, 2, 5])
    assert cls_targets("label", clean_logits, y, 3) is None
    soft = torch.softmax(clean_logits, 1)
    assert torch.allclose(cls_targets("clean", clean_logits, y, 3), soft)
    mixed = cls_targets("mixed", clean_logits, y, 4)
    assert torch.allclose(mixed[:4], soft[:4])  # clean rows: f's prediction on the clean image
    assert torch.equal(mixed[4:], torch.nn.functional.one_hot(y[4:], 10).float())  # adversarial rows: the label
    assert torch.equal(cls_targets("mixed", clean_logits, y, 6), cls_targets("clean", clean_logits, y, 6))


def test_atop_soft_target_trains_and_is_recorded(tmp_path):
    from atop_serve.errors import AtopError
    from training.purifier import PurifierConfig, train

    src = make_model_folder(tmp_path / "src")
    cfg = PurifierConfig(mode="atop", epochs=1, limit=100, batch_size=50, eval_n=20, data=str(DATA_ROOT), lam=1.0,
                         cls_target="mixed")
    r = train(cfg, tmp_path / "out", src, show_progress=False)
    assert r["classifier_unchanged"] and r["history"][0]["cls"] > 0
    assert modelio.read_card(tmp_path / "out")["purifier"]["atop"]["config"]["cls_target"] == "mixed"
    with pytest.raises(AtopError, match="--cls-target"):
        train(PurifierConfig(mode="atop", cls_target="logits", data=str(DATA_ROOT)), tmp_path / "bad", src,
              show_progress=False)


def test_atop_fine_tunes_into_a_same_shaped_architecture(tmp_path):
    """--arch gated-unet-lrelu starts from the source's gated-unet weights; a differently shaped one is refused."""
    from atop_serve.errors import AtopError
    from training.purifier import PurifierConfig, carry_weights, train

    src = make_model_folder(tmp_path / "src")
    g, _ = modelio.load_purifier(src)
    moved = carry_weights(g, "gated-unet-lrelu")
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), moved.state_dict().values()))
    x, m = torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        assert not torch.equal(g.eval()(x, m), moved.eval()(x, m))  # same weights, another activation
    with pytest.raises(AtopError, match="do not fit"):
        carry_weights(g, "gated-unet-paper")
    cfg = PurifierConfig(mode="atop", arch="gated-unet-lrelu", epochs=1, limit=100, batch_size=100, eval_n=20,
                         data=str(DATA_ROOT), lam=0.5)
    train(cfg, tmp_path / "out", src, show_progress=False)
    assert modelio.read_card(tmp_path / "out")["purifier"]["arch"] == "gated-unet-lrelu"
    loaded = modelio.load_pipeline(tmp_path / "out").purifier
    assert loaded.e1.act.func is torch.nn.functional.leaky_relu


def test_pretraining_lowers_the_reconstruction_loss(tmp_path):
    from training.purifier import PurifierConfig, train

    src = make_model_folder(tmp_path / "src")
    cfg = PurifierConfig(mode="pretrain", epochs=3, limit=600, batch_size=100, eval_n=50, data=str(DATA_ROOT), lr=3e-3)
    hist = train(cfg, tmp_path / "pur", src, show_progress=False)["history"]
    assert hist[-1]["l1"] < 0.8 * hist[0]["l1"]
    pipe = load_pipeline(tmp_path / "pur")
    assert pipe.transform.kind == "rt2"


def test_cli_atop_from_the_shipped_model_refuses_a_misfit_architecture(tmp_path, monkeypatch, capsys):
    """`--model default` names the shipped folder (as everywhere); a purifier it cannot carry weights into is a
    clear one-line error with exit code 2, and nothing is written."""
    import atop_cli

    monkeypatch.setattr(sys, "argv", ["atop", "train", "atop", "--model", "default", "--arch", "gated-unet-paper",
                                      "--out", str(tmp_path / "out"), "--limit", "100", "--epochs", "1",
                                      "--data", str(DATA_ROOT)])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "do not fit" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_whitening_sample_covers_every_class_of_a_class_sorted_set():
    # image folders are read class by class: the whitening conv must not be fit on the first class alone
    from training.classifier import whitening_sample
    from training.data import Dataset

    labels = torch.arange(10).repeat_interleave(600)  # sorted, as an image folder loads
    data = Dataset(torch.zeros(6000, 3, 32, 32, dtype=torch.uint8), labels, [str(c) for c in range(10)], "sorted")
    sample = whitening_sample(data, n=5000, seed=0)
    assert sample.labels.bincount(minlength=10).tolist() == [500] * 10


def test_distillation_learns_the_teachers_targets(tmp_path, short_run):
    # a teacher whose class outputs are rotated by one: a student trained on its probabilities alone
    # (--distill 1) must predict the rotated classes, which labels alone would never teach
    shutil.copytree(short_run["out"], tmp_path / "t")
    teacher = modelio.load_classifier(tmp_path / "t", tta="none").classifier
    with torch.no_grad():
        teacher.head.weight.copy_(teacher.head.weight.roll(1, dims=0))  # logit c+1 <- old logit c
    modelio.save_weights(teacher, tmp_path / "t" / modelio.CLASSIFIER_FILE)
    card = modelio.read_card(tmp_path / "t")
    card["classifier"]["sha256"] = modelio.sha256(tmp_path / "t" / modelio.CLASSIFIER_FILE)
    modelio.write_card(tmp_path / "t", card)

    _train(tmp_path / "s", epochs=2, teachers=(str(tmp_path / "t"),), distill=1.0, tta="none")
    student = modelio.load_classifier(tmp_path / "s")
    from training.data import load_cifar10

    test = load_cifar10(str(DATA_ROOT))[1].balanced_subset(500)
    with torch.no_grad():
        pred = student(test.images.float() / 255).argmax(1)
    assert (pred == (test.labels + 1) % 10).float().mean() > 0.2  # the teacher's (rotated) classes; chance 0.1
    assert (pred == test.labels).float().mean() < 0.15
    assert modelio.read_card(tmp_path / "s")["classifier"]["training"]["teachers"][0]["folder"] == str(tmp_path / "t")


def test_distillation_refuses_adversarial_training(tmp_path):
    from atop_serve.errors import AtopError

    with pytest.raises(AtopError, match="cannot be combined"):
        _train(tmp_path / "s", teachers=("default",), adversarial="n-fgsm")


def test_purify_rows_replaces_exactly_the_first_rows_by_the_pipelines_purification():
    from atop_serve.pipeline import PurifiedClassifier
    from atop_serve.transforms import draw_rt_inputs
    from training.classifier import Purify

    purify = Purify("default")
    x = torch.rand(6, 3, 32, 32)
    out = purify.purify_rows(x, 4, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and torch.equal(out[4:], x[4:])
    draws = draw_rt_inputs(purify.rt, 4, 1, torch.Generator().manual_seed(3)).flat()
    expected = PurifiedClassifier(purify.purifier, torch.nn.Identity(), purify.rt).purify(x[:4], draws)[0]
    assert torch.allclose(out[:4], expected, atol=1e-6) and not torch.allclose(out[:4], x[:4], atol=0.01)
    assert torch.equal(purify.purify_rows(x, 0, torch.Generator()), x)


def test_training_on_purified_images_is_recorded_and_refuses_bad_settings(tmp_path):
    from atop_serve.errors import AtopError

    result = _train(tmp_path / "p", epochs=1, purifier="default", purified_fraction=0.5, tta="none")
    assert result["metrics"]["test_acc_tta_none"] > 0.15  # one epoch on 2,000 images, half of them purified
    rec = modelio.read_card(tmp_path / "p")["classifier"]["training"]["purifier"]
    assert rec["folder"] == "default" and rec["fraction"] == 0.5
    assert rec["sha256"] == modelio.read_card("default")["purifier"]["sha256"] and rec["rt"]["rate"] == 0.1
    with pytest.raises(AtopError, match="purified-fraction"):
        _train(tmp_path / "q", purifier="default", purified_fraction=1.5)
    with pytest.raises(AtopError, match="cannot be combined"):
        _train(tmp_path / "r", purifier="default", adversarial="n-fgsm")


def test_atop_distils_a_new_architecture_from_a_teacher_purifier(tmp_path):
    """--teacher with an --arch of another shape: a fresh student learns to reproduce the teacher's output on
    the same transformed inputs; the card names the teacher; without --teacher that --arch is still refused."""
    from training.purifier import PurifierConfig, train

    from atop_serve.registry import create_purifier
    from atop_serve.transforms import draw_rt_inputs, random_transform
    from training.data import load_cifar10

    teacher, rt = modelio.load_purifier("default")
    gen = torch.Generator().manual_seed(5)
    x = load_cifar10(str(DATA_ROOT))[1].balanced_subset(40).images.float() / 255

    x_t, mask = random_transform(x, rt, draw_rt_inputs(rt, len(x), 1, gen).flat())

    def gap(g):
        with torch.no_grad():
            return (g.eval()(x_t, mask) - teacher.eval()(x_t, mask)).abs().mean().item()

    torch.manual_seed(0)
    before = gap(create_purifier("gated-unet-s2d"))
    cfg = PurifierConfig(mode="atop", arch="gated-unet-s2d", teacher="default", attack="none", lam=0.0, epochs=3,
                         limit=600, batch_size=100, eval_n=20, lr=3e-3, data=str(DATA_ROOT))
    hist = train(cfg, tmp_path / "out", modelio.resolve("default"), show_progress=False)["history"]
    assert hist[-1]["l1"] < hist[0]["l1"]
    student = modelio.load_pipeline(tmp_path / "out").purifier
    assert gap(student) < 0.7 * before, (gap(student), before)
    card = modelio.read_card(tmp_path / "out")
    pur_card = card["purifier"]
    assert "pretraining" not in pur_card and "atop_earlier" not in pur_card  # the teacher's history is not the student's
    # nor its name, FLOPs count, evaluations or export
    assert not {"name", "flops", "evaluation", "evaluation_of_earlier_weights", "export"} & set(card), sorted(card)
    stage = pur_card["atop"]
    assert stage["teacher"]["arch"] == "gated-unet-lrelu" and modelio.read_card(tmp_path / "out")["purifier"]["arch"] == "gated-unet-s2d"


def test_bf16_is_chosen_where_it_is_faster(tmp_path, monkeypatch):
    """bf16 autocast on CPU with AMX, or AVX-512 BF16 on AMD (Zen 4: faster than fp32), not on an Intel CPU with
    AVX-512 BF16 but no AMX (slower), nor without bf16 instructions; the vendor comes from /proc/cpuinfo."""
    from atop_serve import cpu
    from training import common

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n")
    assert cpu.cpu_vendor(info) == "AuthenticAMD"
    assert cpu.cpu_vendor(tmp_path / "missing") is None
    cases = [({"avx512f", "amx_bf16"}, "GenuineIntel", True), ({"avx512_bf16"}, "AuthenticAMD", True),
             ({"avx512_bf16"}, "GenuineIntel", False), ({"avx512f", "avx2"}, "AuthenticAMD", False),
             (None, None, False)]
    for flags, vendor, expected in cases:
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flags: None if f is None else frozenset(f))
        monkeypatch.setattr(cpu, "cpu_vendor", lambda v=vendor: v)
        assert common.fast_bf16(torch.device("cpu")) is expected, (flags, vendor)


def _cli(monkeypatch, capsys, *args):
    """Run `atop <args>` in this process: (exit status, standard error)."""
    import atop_cli

    monkeypatch.setattr(sys, "argv", ["atop", *args])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, expect", [
    (["classifier", "--epochs", "0"], "--epochs"),
    (["classifier", "--batch-size", "0"], "--batch-size"),
    (["classifier", "--lr", "-1"], "--lr"),
    (["classifier", "--tta", "sideways"], "--tta"),
    (["classifier", "--stop-after", "-1"], "--stop-after"),
    (["purifier", "--sigma", "nan"], "sigma"),
    (["purifier", "--rate", "1"], "rate"),
    (["purifier", "--rt", "rt9"], "rt9"),
    (["atop", "--model", "default", "--lambda", "nan"], "--lambda"),
    (["atop", "--model", "default", "--attack", "pgd-x"], "--attack"),
    (["atop", "--model", "default", "--clean-fraction", "2"], "--clean-fraction"),
])
def test_cli_training_options_out_of_range_fail_before_any_work(tmp_path, monkeypatch, capsys, args, expect):
    """Each was a traceback (ZeroDivisionError, ValueError), or a run that silently ignored it (--lambda nan trained
    without the classification loss, --epochs 0 wrote an untrained model folder): now exit 2, one line, nothing written."""
    code, err = _cli(monkeypatch, capsys, "train", *args, "--out", str(tmp_path / "out"), "--limit", "100",
                     "--data", str(tmp_path / "no-data-needed"))
    assert code == 2 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["model-folder", "shipped", "file"])
def test_cli_training_refuses_an_out_it_would_overwrite(tmp_path, monkeypatch, capsys, where):
    """Without --resume, --out holding a model folder (or the shipped one, or a file) is refused before any work and
    left as it was (was: a fresh run silently replaced its weights and card; a file was a traceback)."""
    out = {"model-folder": tmp_path / "m", "shipped": modelio.DEFAULT_MODEL_DIR, "file": tmp_path / "f"}[where]
    if where == "model-folder":
        make_model_folder(out)
    elif where == "file":
        out.write_text("keep")
    before = {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir()) if p.is_file()}
    code, err = _cli(monkeypatch, capsys, "train", "classifier", "--out", str(out), "--limit", "100",
                     "--data", str(tmp_path / "no-data-needed"))
    assert code == 2 and "--out" in err and "Traceback" not in err, err
    assert before == {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir()) if p.is_file()}


def test_resume_from_a_checkpoint_of_another_architecture_is_an_error(tmp_path):
    from atop_serve.errors import AtopError
    from atop_serve.registry import create_classifier
    from training import common

    common.save_checkpoint(tmp_path / "checkpoint", common.prefixed("model", create_classifier("airnet").state_dict()), {})
    tensors, _ = common.load_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(AtopError, match="does not fit"):
        common.load_state(create_classifier("resnet18"), common.unprefixed("model", tensors), tmp_path / "checkpoint")
