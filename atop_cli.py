"""The ``atop`` command line: data, train, eval, export, bench. ``atop <command> --help`` for each.

Errors a user can fix (bad path, corrupt file, unknown option) print one line and exit with status 2,
never a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from atop_serve.errors import AtopError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train the classifier, pre-train the purifier, run AToP fine-tuning.", no_args_is_help=True)
app.add_typer(train_app, name="train")

DataOpt = typer.Option("", "--data", help="Dataset root: image-folder tree (<root>/<split>/<class>/*) or cifar-10-batches-py folder. Default: $ATOP_DATA or ../shared/data/cifar10-jpeg.")


@app.command()
def data(
    root: str = typer.Argument("", help="Dataset root (default: $ATOP_DATA or ../shared/data/cifar10-jpeg)."),
    download: bool = typer.Option(False, help="Download the official CIFAR-10 archive (MD5-checked) first."),
    size: int = typer.Option(32, help="Resize images of another size to this (bicubic, antialiased)."),
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
    arch: str = typer.Option("airnet", help="Architecture from the registry: airnet, resnet18, wrn-28-10."),
    epochs: int = typer.Option(16, help="Training epochs."),
    batch_size: int = typer.Option(1024, help="Global batch size."),
    lr: float = typer.Option(11.5, help="Learning rate per 1024 examples (airbench scaling)."),
    adversarial: str = typer.Option("none", help="Adversarial training: none, fgsm-rs, pgd (l_inf 8/255)."),
    tta: str = typer.Option("flip-translate", help="Test-time augmentation the model card prescribes: none, flip, flip-translate."),
    limit: int = typer.Option(0, help="Train on a class-balanced subset of N images (0: all)."),
    seed: int = typer.Option(0, help="Random seed."),
    bf16: bool = typer.Option(True, help="bf16 autocast."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data: str = DataOpt,
    resume: bool = typer.Option(False, help="Resume from <out>/checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a CIFAR-10 classifier (airbench recipe); checkpoints every epoch; writes a model folder."""
    from training.classifier import ClassifierConfig, train

    if adversarial not in ("none", "fgsm-rs", "pgd"):
        raise AtopError(f"unknown --adversarial {adversarial!r}; use none, fgsm-rs or pgd")
    cfg = ClassifierConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, adversarial=adversarial, tta=tta,
                           limit=limit, seed=seed, bf16=bf16, device=device, data=data)
    train(cfg, out, resume=resume, show_progress=progress)


def main() -> None:
    try:
        app()
    except AtopError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
