"""The ``atop`` command line: data, train, eval, record, card, export, classify, pack, sweep-*, bench. ``atop <command> --help`` for each.

Errors a user can fix (bad path, corrupt file, unknown option) print one line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from atop_serve.errors import AtopError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train the classifier, pre-train the purifier, run AToP fine-tuning.", no_args_is_help=True)
app.add_typer(train_app, name="train")

DataOpt = typer.Option("", "--data", help="Dataset root: image-folder tree (<root>/<split>/<class>/*) or cifar-10-batches-py folder. Default: $ATOP_DATA or ../shared/data/cifar10-jpeg.")
# options shared by the training commands
LimitOpt = typer.Option(0, help="Train on a class-balanced subset of N images (0: all).")
SeedOpt = typer.Option(0, help="Random seed.")
Bf16Opt = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: where it is faster: CUDA, a CPU with AMX, or an AMD CPU with AVX-512 BF16).", show_default=False)
DeviceOpt = typer.Option("auto", help="auto, cpu or cuda.")
ResumeOpt = typer.Option(False, help="Resume from <out>/checkpoint.")
ProgressOpt = typer.Option(True, help="Show a progress bar.")


@app.command()
def data(
    root: str = typer.Argument("", help="Dataset root (default: $ATOP_DATA or ../shared/data/cifar10-jpeg)."),
    download: bool = typer.Option(False, help="Download the official CIFAR-10 archive (MD5-checked) first."),
    size: int = typer.Option(32, min=1, max=512, help="Resize images of another size to this (bicubic, antialiased; a 60,000-image dataset at 512 px takes 47 GB)."),
):
    """Inspect and verify a dataset: format, counts per class and split, decode every image (cached)."""
    from training.data import detect_format, load_cifar10

    train, test = load_cifar10(root or None, size=size, download=download)
    fmt = detect_format(Path(train.source))
    info = {"source": train.source, "format": fmt, "classes": train.classes,
            "train": len(train), "test": len(test), "image_shape": list(train.images.shape[1:]),
            "train_per_class": train.labels.bincount().tolist(), "test_per_class": test.labels.bincount().tolist()}
    typer.echo(json.dumps(info, indent=1))


@train_app.command("classifier")
def train_classifier(
    out: Path = typer.Option(..., help="Output model folder (card.json + classifier.safetensors + checkpoint/)."),
    arch: str = typer.Option("airnet", help="Architecture from the registry: airnet, airnet-wide, resnet18, wrn-28-10."),
    epochs: int = typer.Option(16, help="Training epochs."),
    batch_size: int = typer.Option(1024, help="Global batch size."),
    lr: float = typer.Option(11.5, help="Learning rate per 1024 examples (airbench scaling)."),
    adversarial: str = typer.Option("none", help="Adversarial training at l_inf 8/255: none, fgsm-rs, n-fgsm (single step, no catastrophic overfitting; the recommended AT baseline), pgd (PGD-7, 7x the cost)."),
    tta: str = typer.Option("flip-translate", help="Test-time augmentation the model card prescribes: none, flip, flip-translate."),
    limit: int = LimitOpt,
    eval_n: int = typer.Option(0, help="Class-balanced test images for the final accuracy (0: all 10,000)."),
    stop_after: int = typer.Option(0, help="End this run after N epochs; continue later with --resume (0: run to the end)."),
    teacher: Optional[list[str]] = typer.Option(None, help="Distil from this model folder's classifier (repeat for an ensemble: mean logits, no TTA)."),
    distill: float = typer.Option(0.5, help="With --teacher: weight of the teachers' probabilities in the target; the rest is the label-smoothed labels."),
    purifier: str = typer.Option("", help="Model folder whose frozen purifier (with its card's random transform) purifies part of every batch: the classifier also learns the images the purified pipeline feeds it ('default': the shipped one)."),
    purified_fraction: float = typer.Option(0.5, help="With --purifier: share of each batch replaced by g(RT(x))."),
    seed: int = SeedOpt,
    bf16: Optional[bool] = Bf16Opt,
    device: str = DeviceOpt,
    data: str = DataOpt,
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
):
    """Train a CIFAR-10 classifier (airbench recipe); checkpoints every epoch; writes a model folder."""
    from training.classifier import ADVERSARIAL, ClassifierConfig, train

    if adversarial not in ADVERSARIAL:
        raise AtopError(f"unknown --adversarial {adversarial!r}; use one of {', '.join(ADVERSARIAL)}")
    cfg = ClassifierConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, adversarial=adversarial, tta=tta,
                           limit=limit, eval_n=eval_n, stop_after=stop_after, seed=seed, bf16=bf16, device=device, data=data,
                           teachers=tuple(teacher or ()), distill=distill, purifier=purifier,
                           purified_fraction=purified_fraction)
    train(cfg, out, resume=resume, show_progress=progress)


def _purifier_cmd(mode: str, out, source, classifier_source=None, **kw):
    from training.purifier import PurifierConfig, train

    resume, progress = kw.pop("resume"), kw.pop("progress")
    cfg = PurifierConfig(mode=mode, **kw)
    train(cfg, out, source, resume=resume, show_progress=progress, classifier_source=classifier_source)


@train_app.command("purifier")
def train_purifier(
    out: Path = typer.Option(..., help="Output model folder (classifier copied in, purifier added)."),
    classifier: str = typer.Option("default", help="Model folder whose classifier the pipeline uses ('default': the shipped one)."),
    arch: str = typer.Option("gated-unet", help="Purifier architecture: gated-unet, gated-unet-lrelu, gated-unet-paper."),
    rt: str = typer.Option("rt2", help="Random transform: rt1, rt2, rt3."),
    sigma: float = typer.Option(0.1, help="Noise std of RT2/RT3 (images in [0, 1])."),
    sigma_range: bool = typer.Option(False, help="Draw each image's sigma from U(0, sigma): one purifier for a sigma sweep."),
    rate: float = typer.Option(0.25, help="Share of 4x4 blocks masked."),
    epochs: int = typer.Option(10, help="Epochs."),
    batch_size: int = typer.Option(256, help="Global batch size."),
    lr: float = typer.Option(1e-3, help="Adam learning rate of the purifier (cosine-decayed)."),
    gan_weight: float = typer.Option(0.01, help="Weight of the hinge GAN loss relative to L1."),
    limit: int = LimitOpt,
    eval_n: int = typer.Option(1000, help="Balanced test images for the final clean-accuracy check."),
    seed: int = SeedOpt,
    bf16: Optional[bool] = Bf16Opt,
    device: str = DeviceOpt,
    data: str = DataOpt,
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
):
    """Pre-train the purifier g on RT-transformed images: hinge GAN loss + L1 reconstruction."""
    _purifier_cmd("pretrain", out, Path(classifier) if classifier != "default" else None, arch=arch, rt=rt, sigma=sigma,
                  sigma_range=sigma_range, rate=rate, epochs=epochs, batch_size=batch_size, lr=lr, gan_weight=gan_weight,
                  limit=limit, eval_n=eval_n, seed=seed, bf16=bf16, device=device, data=data, resume=resume, progress=progress)


@train_app.command("atop")
def train_atop(
    model: str = typer.Option(..., help="Model folder with the pre-trained purifier and the classifier."),
    out: Path = typer.Option(..., help="Output model folder."),
    classifier: Optional[str] = typer.Option(None, help="Take the (frozen) classifier from this model folder instead."),
    arch: str = typer.Option("", help="Fine-tune into this purifier architecture, starting from the model's weights (same parameters required, e.g. gated-unet -> gated-unet-lrelu; another shape only with --teacher, from scratch; default: the model's own)."),
    sigma: Optional[float] = typer.Option(None, help="Noise std for fine-tuning (default: the model's RT sigma)."),
    epochs: int = typer.Option(10, help="Epochs."),
    batch_size: int = typer.Option(256, help="Global batch size."),
    lr: float = typer.Option(5e-4, help="Adam learning rate of the purifier (cosine-decayed)."),
    lam: float = typer.Option(0.05, "--lambda", help="Weight of the classification loss CE(f(g(RT(x'))), y)."),
    warmup_epochs: int = typer.Option(0, help="Epochs with lambda = 0 first."),
    attack: str = typer.Option("fgsm", help="Attack making x' per batch: fgsm (random start), pgd-<k>, none."),
    attack_target: str = typer.Option("classifier", help="classifier (the paper's code) or pipeline (through g with fresh RT)."),
    clean_fraction: float = typer.Option(0.5, help="Share of each batch left clean (variant a); the rest adversarial (b)."),
    gan_weight: float = typer.Option(0.01, help="Weight of the hinge GAN loss relative to L1."),
    cls_target: str = typer.Option("label", help="Target of the classification loss: label (CE to y, the paper's), clean (soft CE to f's prediction on the clean image: keep what f says on x), or mixed (that soft target on the batch's clean rows, the label on its adversarial rows)."),
    teacher: str = typer.Option("", help="Distil: this model folder's purifier output on the same RT(x') is the L1 target (with --arch of another shape: a fresh student)."),
    limit: int = LimitOpt,
    eval_n: int = typer.Option(1000, help="Balanced test images for the final clean-accuracy check."),
    seed: int = SeedOpt,
    bf16: Optional[bool] = Bf16Opt,
    device: str = DeviceOpt,
    data: str = DataOpt,
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
):
    """AToP fine-tuning: only the purifier learns, L = l_g(x') + lambda * CE(f(g(RT(x'))), y), classifier frozen."""
    from atop_serve import modelio

    rt_cfg = modelio.read_card(modelio.resolve(model)).get("purifier", {}).get("rt")
    if not rt_cfg:
        raise AtopError(f"{model} holds no purifier: pre-train one with `atop train purifier` first")
    _purifier_cmd("atop", out, model, classifier_source=classifier, arch=arch, rt=rt_cfg["kind"], sigma=rt_cfg["sigma"] if sigma is None else sigma,
                  rate=rt_cfg["rate"], block=rt_cfg["block"], views=rt_cfg["views"], epochs=epochs, batch_size=batch_size,
                  lr=lr, lam=lam, warmup_epochs=warmup_epochs, attack=attack, attack_target=attack_target,
                  clean_fraction=clean_fraction, gan_weight=gan_weight, cls_target=cls_target, teacher=teacher, limit=limit, eval_n=eval_n, seed=seed, bf16=bf16,
                  device=device, data=data, resume=resume, progress=progress)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("default", help="Model folder ('default': the shipped model); with --preset table7 a comma-separated list."),
    threat: str = typer.Option("classifier", help="Threat model: classifier, pipeline, pipeline-fixed, transfer, bare."),
    source: Optional[str] = typer.Option(None, help="Transfer threat: model folder whose classifier crafts the examples."),
    attacks: str = typer.Option("clean,fgsm,pgd-20", help="Comma-separated: clean, fgsm, pgd-<k>, pgd-l2-<k>, apgd-ce, apgd-dlr, apgd-t, fab-t, square, stadv, autoattack, autoattack-rand; options as name@key=value, e.g. pgd-20@eps=4/255@restarts=5."),
    n: int = typer.Option(1000, help="Class-balanced test images (a fixed subset per seed)."),
    batch_size: int = typer.Option(250, help="Batch size."),
    samples: Optional[int] = typer.Option(None, help="K purifications averaged per prediction (default: the K the model card recommends, pipeline.samples)."),
    eot: int = typer.Option(8, help="EOT: gradient samples per attack step (pipeline threat)."),
    attack_samples: Optional[int] = typer.Option(None, help="Pipeline threat: purifications K averaged in each of the attack's forward passes (default: the evaluated K). 1 with --eot E averages the gradients of E single purifications (K times cheaper per pass than averaging K logits inside each pass)."),
    eps: Optional[str] = typer.Option(None, help="Attack budget, e.g. 8/255 (default 8/255 l_inf, 0.5 l_2)."),
    alpha: Optional[str] = typer.Option(None, help="PGD step size (default eps/4)."),
    restarts: int = typer.Option(1, help="Random restarts of PGD/APGD (worst case per image)."),
    eps_sweep: str = typer.Option("", help="Also run --sweep-attack at these eps, e.g. 0,2,4,8,16/255 (plotted)."),
    sweep_attack: str = typer.Option("pgd-20", help="The attack of the eps sweep and the sanity checks (pgd-<k>)."),
    sanity: bool = typer.Option(False, "--sanity", help="Run and report the sanity checks (eps sweep, unbounded, steps/EOT, Square)."),
    sanity_queries: int = typer.Option(5000, help="Square queries in the sanity check."),
    sigma: Optional[float] = typer.Option(None, help="Override the RT noise sigma."),
    rate: Optional[float] = typer.Option(None, help="Override the RT mask rate (share of blocks missing)."),
    rt: Optional[str] = typer.Option(None, help="Override the RT kind: rt1, rt2, rt3 (table7: comma-separated list)."),
    tta: Optional[str] = typer.Option(None, help="Override the classifier TTA: none, flip, flip-translate."),
    mirror: Optional[bool] = typer.Option(None, "--mirror/--no-mirror", help="Override the card's pipeline.mirror (odd-numbered purification samples on the mirrored image).", show_default=False),
    quantize: bool = typer.Option(False, help="Round adversarial images to 8 bits as the service does (BPDA gradients)."),
    graph: str = typer.Option("torch", help="What scores the images: torch (eager pipeline), onnx (the folder's pipeline.onnx, as served) or opt (pipeline.opt.onnx, the faster CPU variant). Attacks take gradients in PyTorch either way."),
    url: Optional[str] = typer.Option(None, "--url", help="Score with a running service of this model folder instead (e.g. http://127.0.0.1:3000): adversarial images rounded to 8 bits and sent as PNG to /classify_batch; the server's own fresh draws. Checks that it serves the folder's weights."),
    seed: int = typer.Option(0, help="Seed for the subset, random starts and RT draws."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Attack gradients under bf16 autocast (default: where it is faster: CUDA, a CPU with AMX, or an AMD CPU with AVX-512 BF16); accuracy is always fp32.", show_default=False),
    device: str = DeviceOpt,
    data: str = DataOpt,
    out: Optional[Path] = typer.Option(None, help="Report folder: report.json, report.md, plots, per-attack results (resumable)."),
    grid: int = typer.Option(8, help="Images in the clean/adversarial/purified grid."),
    preset: Optional[str] = typer.Option(None, help="table7: the paper's Table 7 grid (clean, FGSM, PGD-10/20/1000, classifier threat) over --model folders and --rt kinds. table1: the paper's Table 1 comparison over --model folders (classifier-only folders bare, purifier folders under the classifier threat; clean, FGSM, PGD-20, l_2 PGD-20, StAdv)."),
    record: bool = typer.Option(False, "--record", help="Afterwards write the report into the model card's `evaluation` (as `atop record <out>`; needs --out; not with --preset)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Accuracy under attack for one threat model, with 95 % intervals; writes a resumable report folder."""
    from training.evaluate import EvalConfig, evaluate, parse_eps_list, parse_number, table1, table7

    cfg = EvalConfig(threat=threat, attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), n=n,
                     batch_size=batch_size, samples=samples, eot=eot, attack_samples=attack_samples,
                     eps=parse_number(eps) if eps is not None else None,
                     alpha=parse_number(alpha) if alpha is not None else None, restarts=restarts, sigma=sigma, rate=rate,
                     rt=rt, tta=tta, mirror=mirror, source=source, quantize=quantize, seed=seed, bf16=bf16, device=device, data=data,
                     sanity=sanity, eps_sweep=parse_eps_list(eps_sweep), sweep_attack=sweep_attack,
                     sanity_queries=sanity_queries, grid=grid, graph=graph, url=url)
    if record and (out is None or preset is not None):
        raise AtopError("--record writes the report folder into the card: give --out, and record a preset's row "
                        "folders one by one with `atop record`")
    if preset is not None:
        if preset not in ("table7", "table1"):
            raise AtopError(f"unknown --preset {preset!r}; valid: table7, table1")
        if out is None:
            raise AtopError(f"--preset {preset} needs --out <folder>")
        folders = [m.strip() for m in model.split(",") if m.strip()]
        if preset == "table1":
            if attacks == "clean,fgsm,pgd-20":
                cfg.attacks = ()
            typer.echo(table1([None if f == "default" else f for f in folders], cfg, out, show_progress=progress))
            return
        rts = [r.strip() for r in rt.split(",")] if rt else None
        if attacks == "clean,fgsm,pgd-20":  # the default: use Table 7's columns
            cfg.attacks = ()
        cfg.rt = None
        typer.echo(table7([None if f == "default" else f for f in folders], cfg, out, rts, show_progress=progress))
        return
    evaluate(None if model == "default" else model, cfg, show_progress=progress, out=out)
    if record:
        from training.records import record as record_reports

        written = record_reports(model, [out])
        typer.echo(f"recorded in {model}'s card as {written[0]['name']!r}", err=True)


@app.command()
def record(
    reports: list[Path] = typer.Argument(..., help="Report folders written by `atop eval --out` (each holds report.json)."),
    model: str = typer.Option("default", help="Model folder whose card gets the entries ('default': the shipped one)."),
    name: Optional[str] = typer.Option(None, help="Entry name (one report only; default: the report folder's name). An entry of that name is replaced."),
    note: Optional[str] = typer.Option(None, help="A note stored with each entry."),
):
    """Write finished `atop eval` reports into a model card's `evaluation`, after checking that each measured this folder's weights and configuration.

    An entry holds the threat, images, K, RT, accuracies with 95 % intervals, the eval command, the machine, the commit and the report's path. A report of other weights, or of this folder before its card's architecture/RT/TTA/K entries changed, is refused with exit status 2 and the card is left unchanged. Overrides the eval applied (--rt, --rate, --samples, ...) are recorded in the entry.
    """
    from training.records import record as record_reports

    written = record_reports(model, reports, name=name, note=note)
    typer.echo(json.dumps({"model": model, "entries": written}, indent=1))


@app.command()
def card(
    model: str = typer.Option("default", "--model", help="Model folder ('default': the shipped one)."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if MODEL_CARD.md is missing or differs from what card.json renders to."),
):
    """Render a model folder's card.json into MODEL_CARD.md, its card for people (every command that writes a card writes both; this re-renders folders made before that).

    No torch: a serving install runs it.
    """
    from atop_serve import modelcard, modelio

    folder = modelio.resolve(None if model == "default" else model)
    page = folder / modelcard.FILE
    card_ = modelio.read_card(folder)
    text = modelcard.render(card_)
    if check:
        if not page.is_file() or page.read_text() != text:
            typer.echo(f"{page} is {'stale' if page.is_file() else 'missing'}: run `atop card --model {model}`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{page} is up to date")
        return
    typer.echo(f"wrote {modelcard.write(folder, card_)}")


@app.command()
def export(
    model: str = typer.Option("default", "--model", help="Model folder to export (card.json + safetensors), or 'default': the shipped atop_serve/models/default."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (CPU graph + verified faster variant), tensorrt (adds a Torch-TensorRT fp16 program; needs a CUDA GPU and torch_tensorrt) or all."),
    out: Optional[Path] = typer.Option(None, "--out", help="Serving folder to write: card.json + pipeline.onnx (+ pipeline.opt.onnx, pipeline.trt.ep). Default: the model folder itself (files added, card updated in place)."),
    name: str = typer.Option("atop-default", "--name", help="Model name in the BentoML store ($BENTOML_HOME, default ~/bentoml)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Also save the serving folder into the BentoML model store."),
    verify_n: int = typer.Option(1000, "--verify-n", help="Class-balanced test images for the exported-vs-PyTorch check (and the variant's clean-accuracy gate)."),
    data: str = DataOpt,
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Build, measure and (if >= 1.1x faster and within 0.5 point of fp32 in clean and robust accuracy) ship a faster CPU variant."),
    calib_n: int = typer.Option(1024, "--calib-n", help="Training images calibrating the int8 candidate."),
    robust_n: int = typer.Option(1000, "--robust-n", help="Verification images attacked (PGD-20 on the classifier) for the variant's robust-accuracy gate (0: gate on clean accuracy only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the verification subset and of the shared mask/noise draws."),
    variants: str = typer.Option("", "--variants", help="Comma-separated faster-CPU candidates to build and measure (default: all: ort-offline, int8, int8-full, int8-full-in, int8-full-gate). The fastest accepted one on the exporting CPU ships; exporting on another CPU than the one that will serve, name the variant measured fastest there."),
    list_store: bool = typer.Option(False, "--list", help="List the BentoML store entries (name:version, size, created, metrics) and exit."),
):
    """Export the purified classifier to one verified ONNX graph (+ TensorRT), as a serving folder and a BentoML model.

    The graph takes the random transform's draws as inputs (u_mask, z, u_mix): the server draws fresh randomness per request, verification feeds PyTorch and the graph identical draws. Every export is verified on real test images (fp32 ONNX on CPU: max |logit diff| <= 1e-4, 100 % top-1 agreement) and fails with exit status 2, leaving nothing behind, past that tolerance. See docs/export.md.
    """
    if list_store:
        from export.store import format_listing, list_entries

        typer.echo(format_listing(list_entries()))
        return
    from export.build import export_model

    summary = export_model(model, out, fmt=fmt, name=name, register=register, verify_n=verify_n, data=data or None,
                           optimize=optimize, calib_n=calib_n, robust_n=robust_n, seed=seed, variants=variants or None,
                           command=" ".join(["atop", *sys.argv[1:]]), log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(summary, indent=1))


@app.command()
def classify(
    paths: list[Path] = typer.Argument(..., help="Image files, and folders searched recursively for image files (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, ...).", show_default=False),
    model: str = typer.Option("default", "--model", help="Serving folder (card.json + pipeline.onnx, from `atop export`), or 'default': the shipped one."),
    samples: int = typer.Option(0, "--samples", min=0, max=256, help="Purifications K averaged per image (0: the card's recommended K)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Reproducible draws: the service's answer for this seed (default: fresh draws per image, as the service)."),
    fmt: str = typer.Option("table", "--format", help="table (label, probability, file), csv (every class probability) or jsonl (the service's answer plus the file)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results to this file (complete or not at all: an earlier file is replaced only when the run finishes) instead of standard output."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="Images per engine call (each K rows)."),
    graph: str = typer.Option("auto", "--graph", help="auto (the card's faster CPU variant where this CPU runs it exactly, else fp32), fp32 or opt: as the service's ATOP_GRAPH."),
    threads: int = typer.Option(0, "--threads", min=0, max=256, help="ONNX Runtime threads (0: all cores)."),
    score: bool = typer.Option(False, "--score", help="Files sit in folders named after their class (e.g. ../shared/data/cifar10-jpeg/test/cat/0000.jpg): also print the top-1 accuracy against those names."),
    progress: bool = ProgressOpt,
):
    """Classify image files on disk with the purified pipeline: no server and no torch (a serving install runs it).

    Each file is decoded and classified as the service's /classify would (same resize, engine and draws). A file that cannot be read gets a row with its error and the rest are still classified; the exit status is then 1 (2 for a bad option, path or model folder, 0 when every file was classified).
    """
    import time

    from atop_serve import modelio
    from atop_serve.engine import load_engine
    from atop_serve.offline import FORMATS, AtomicFile, FolderScore, Writer, classify_files, find_images
    from atop_serve.settings import GRAPH_CHOICES

    if fmt not in FORMATS:
        raise AtopError(f"--format {fmt!r}: valid: {', '.join(FORMATS)}")
    if graph not in GRAPH_CHOICES:
        raise AtopError(f"--graph {graph!r}: valid: {', '.join(GRAPH_CHOICES)}")
    files = find_images(paths)
    target = AtomicFile(out) if out is not None else None  # checks --out before the model loads
    engine = load_engine(modelio.resolve(model), threads, graph=graph)
    if out is not None:  # the path --out's rename replaces (a link itself, not its target)
        place = lambda p: p.parent.resolve() / p.name  # noqa: E731
        if place(out).parent == modelio.resolve(model).resolve() or place(out) in {place(f) for f in files}:
            raise AtopError(f"--out {out} is in the model folder or is one of the images to classify: name a file "
                            "elsewhere")
    k = samples or modelio.default_samples(engine.card)
    start, failed = time.perf_counter(), 0
    scores = FolderScore(engine.classes) if score else None
    with _progress(progress, len(files)) as advance, (target or _stdout()) as stream:
        writer = Writer(stream, fmt, engine.classes, k)
        for r in classify_files(engine, files, k, seed, batch_size):
            writer.write(r)
            failed += bool(r.error)
            if scores is not None:
                scores.add(r)
            advance()
    seconds = time.perf_counter() - start
    info = engine.describe()
    typer.echo(f"{len(files) - failed} of {len(files)} files classified"
               f"{f', {failed} could not be read' if failed else ''} in {seconds:.1f} s "
               f"({len(files) / seconds:.0f} files/s; K = {k}; {info['backend']} {info.get('graph', 'eager')})"
               + (f"; results in {out}" if out is not None else ""), err=True)
    if scores is not None:
        typer.echo(scores.summary(), err=True)
    if failed:
        raise typer.Exit(1)


class _stdout:
    """Standard output as a context manager that is flushed, not closed, on exit."""

    def __enter__(self):
        return sys.stdout

    def __exit__(self, *exc):
        sys.stdout.flush()


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """A progress bar on standard error (when it is a terminal) for ``total`` items; yields advance()."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress

    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task("classifying", total=total)
        yield lambda: bar.advance(task)


def _sweep(param: str, model: str, values: str, attacks: str, threat: str, n: int, samples, batch_size: int,
           seed: int, data: str, out: Path, progress: bool) -> None:
    from training.evaluate import EvalConfig
    from training.sweep import sweep_rt

    try:
        vals = [float(s) for s in values.split(",") if s.strip()]
    except ValueError:
        raise AtopError(f"--{param}s must be comma-separated numbers, got {values!r}") from None
    if not vals:
        raise AtopError(f"--{param}s: give at least one value")
    cfg = EvalConfig(threat=threat, attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), n=n,
                     samples=samples, batch_size=batch_size, seed=seed, data=data, grid=0)
    sweep_rt(model, param, vals, cfg, out, show_progress=progress)


def _sweep_command(param: str, values: str, n_default: int, what: str, doc: str):
    """``atop sweep-<param>``: one definition for every swept RT parameter."""

    def command(
        model: str = typer.Option("default", help="Model folder with a purifier ('default': the shipped one)."),
        values_: str = typer.Option(values, f"--{param}s", help=f"Comma-separated {what}."),
        attacks: str = typer.Option("clean,pgd-20", help="Attacks per point (see atop eval)."),
        threat: str = typer.Option("classifier", help="Threat model (see atop eval); under 'classifier' the examples are crafted once for all points."),
        n: int = typer.Option(n_default, help="Class-balanced test images."),
        samples: Optional[int] = typer.Option(None, help="K purifications per prediction (default: the card's)."),
        batch_size: int = typer.Option(250, help="Batch size."),
        seed: int = typer.Option(0, help="Seed."),
        data: str = DataOpt,
        out: Path = typer.Option(..., help="Output folder (sweep.json, sweep.md, sweep.png, one report per point)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ):
        _sweep(param, model, values_, attacks, threat, n, samples, batch_size, seed, data, out, progress)

    command.__doc__ = doc
    app.command(f"sweep-{param}")(command)


_sweep_command("sigma", "0,0.05,0.1,0.15,0.2,0.25", 500, "noise levels",
               "Clean vs robust accuracy as a function of the RT noise sigma, plotted: choose sigma by measurement.")
_sweep_command("rate", "0,0.05,0.1,0.15,0.25", 1000, "mask rates (share of blocks missing, in [0, 1))",
               "Clean vs robust accuracy as a function of the RT mask rate, plotted: the serving-time trade-off of masking.")


@app.command()
def pack(
    model: str = typer.Option(..., help="Trained model folder (card.json + safetensors)."),
    out: Path = typer.Option(..., help="Folder to write (replaced atomically)."),
    half: bool = typer.Option(True, help="Store weights as float16 (half the size; loaded back as float32)."),
    tta: Optional[str] = typer.Option(None, help="Set the classifier's test-time augmentation in the packed card: none, flip, flip-translate (default: keep)."),
    samples: Optional[int] = typer.Option(None, help="Set the recommended purification samples K (card pipeline.samples: the default of load_pipeline, atop eval and the service)."),
    mirror: Optional[bool] = typer.Option(None, "--mirror/--no-mirror", help="Feed the odd-numbered purification samples the mirrored image (card pipeline.mirror: flip TTA inside K at no extra cost; default: keep).", show_default=False),
    rate: Optional[float] = typer.Option(None, help="Set the random transform's mask rate at serving time (card purifier.rt.rate, in [0, 1); default: keep)."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Pair the purifier with this model folder's classifier instead (same classes; the card records the swap and drops the old evaluations)."),
):
    """Copy a model folder for shipping: card and weights only, optionally float16 weights."""
    from export.pack import pack as pack_folder

    card = pack_folder(model, out, half=half, tta=tta, samples=samples, mirror=mirror, rate=rate, classifier=classifier)
    sizes = {p.name: p.stat().st_size for p in Path(out).iterdir()}
    typer.echo(json.dumps({"out": str(out), "files": sizes, "classes": len(card["classes"])}, indent=1))


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AtopError(f"{option} must be comma-separated integers, got {text!r}") from None


@app.command()
def bench(
    model: str = typer.Option("default", "--model", help="Model folder with pipeline.onnx (weights, where present, for the PyTorch backends), or 'default': the shipped one."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Report folder: report.json, report.md, latency_vs_batch.png, throughput_vs_concurrency.png (docs/bench for the published numbers)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes and few repeats, under 2 minutes: a smoke run, not numbers to publish."),
    backends: str = typer.Option("", "--backends", help="Comma-separated subset of torch-fp32, torch-bf16, ort-fp32, ort-opt, ort-cuda-fp32, ort-trt-fp16, torch-trt-fp16 (default: all; those that cannot run here are skipped with the reason, and so is torch-bf16 on an x86 CPU without bf16 instructions unless named here)."),
    batch_sizes: str = typer.Option("", "--batch-sizes", help="Model-level batch sizes (default 1,8,32,128,256; quick 1,32)."),
    samples: str = typer.Option("", "--samples", help="Purification samples K per image (default 1,4; quick 1)."),
    concurrency: str = typer.Option("", "--concurrency", help="HTTP concurrency levels (default 1,8,32,128; quick 1,8,32)."),
    requests: int = typer.Option(0, "--requests", help="Most requests per concurrency level (default 2000; quick 96)."),
    level_seconds: float = typer.Option(0.0, "--level-seconds", help="Most seconds per concurrency level (default 15; quick 5)."),
    batching: str = typer.Option("", "--batching", help="ATOP_MAX_BATCH_SIZE values the HTTP runs try, one server each (default 16,64,128; quick: the settings default)."),
    http: bool = typer.Option(True, "--http/--no-http", help="Also benchmark the live service: bentoml serve on 127.0.0.1, driven by the async load generator."),
    url: Optional[str] = typer.Option(None, "--url", help="Drive this running server (http://127.0.0.1:<port>) instead of starting one."),
    threads: int = typer.Option(0, "--threads", help="Model-level CPU threads for PyTorch and ONNX Runtime (0: all cores)."),
    budget: float = typer.Option(0.0, "--budget", help="Wall-clock budget in seconds (default 840; quick 110); cells past it are skipped and say so."),
    data: str = DataOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the image choice and order."),
    setting: Optional[list[str]] = typer.Option(None, "--setting", help="ATOP_NAME=value for the servers the HTTP level starts, repeatable (e.g. --setting ATOP_FAST_PATH=0 --setting ATOP_ACCESS_LOG=0: measure a setting); recorded in the report."),
):
    """Benchmark every backend (bare classifier vs purified pipeline) and the live HTTP service; write JSON, Markdown and plots.

    Model level: p50/p95/p99 latency and images/s per backend, K and batch size on fresh real images, with FLOPs per image, this machine's matmul peak and DiffPure's compute for reference. HTTP level: bentoml serve at each concurrency, requests/s, latency and errors, and the batching settings chosen from the runs. See docs/benchmarks.md.
    """
    from training.bench import BenchConfig, run_bench, write_report

    cfg = BenchConfig(model=model, out=out, quick=quick, backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
                      batch_sizes=_int_list(batch_sizes, "--batch-sizes"), samples=_int_list(samples, "--samples"),
                      concurrency=_int_list(concurrency, "--concurrency"), requests=requests, level_seconds=level_seconds,
                      batching=_int_list(batching, "--batching"), http=http, url=url, threads=threads, budget_s=budget,
                      data=data or None, seed=seed, command=" ".join(["atop", *sys.argv[1:]]),
                      settings=tuple(setting or ()))
    report = run_bench(cfg, log=lambda m: typer.echo(m, err=True))
    files = write_report(report, out)
    typer.echo(json.dumps({**files, "wall_seconds": report["wall_seconds"], "busy": report.get("busy"),
                           "bars": [{k: b[k] for k in ("bar", "value", "passed")} for b in report["bars"]]}, indent=1))


def main() -> None:
    try:
        app()
    except AtopError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C inside a command into a silent exit 130: say why
            typer.echo("interrupted", err=True)
        raise
    except BrokenPipeError:  # the reader of standard output went away (`atop classify ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail again
        sys.exit(1)


if __name__ == "__main__":
    main()
