"""Pack a trained model folder for shipping: card + weights only (no checkpoints, grids or logs),
optionally with the weights stored as float16 (half the size; loading casts them back to float32, and every
number measured afterwards is measured on the packed weights).

    atop pack --model runs/atop --out atop_serve/models/default --half
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from atop_serve import modelio


def pack(src, out: Path, half: bool = True, tta: str | None = None, samples: int | None = None,
         mirror: bool | None = None, rate: float | None = None, classifier=None) -> dict:
    """Write ``out`` from the model folder ``src``; ``tta`` (none, flip, flip-translate) replaces the classifier's
    test-time augmentation in the card, ``samples`` the recommended purification samples K (``pipeline.samples``:
    what ``load_pipeline`` and the service use by default), ``mirror`` whether the odd-numbered samples see the
    mirrored image (``pipeline.mirror``), ``rate`` the random transform's mask rate at serving time
    (``purifier.rt.rate``; the training's own rate stays in the purifier's training config), ``classifier``
    another model folder whose classifier (card section and weights) replaces ``src``'s: the purifier stays, and
    ``pipeline.classifier_swap`` records what it was fine-tuned against (until an AToP stage fine-tunes it against the
new one: ``training.purifier.settle_classifier_swap``); the card's evaluations, which measured
    the replaced pipeline, are dropped. Each changes the served function: measure the packed folder."""
    from atop_serve.config import RTConfig
    from atop_serve.errors import AtopError
    from atop_serve.pipeline import TTA_MODES

    if tta is not None and tta not in TTA_MODES:
        raise AtopError(f"unknown --tta {tta!r}; valid: {', '.join(TTA_MODES)}")
    if samples is not None and samples < 1:
        raise AtopError(f"--samples must be >= 1, got {samples}")
    src = modelio.resolve(src)
    card = modelio.read_card(src)
    sources = {"classifier": src, "purifier": src}
    if classifier is not None:
        sources["classifier"] = modelio.resolve(classifier)
        card = swap_classifier(card, src, sources["classifier"])
    if tta is not None:
        card["classifier"]["tta"] = tta
        if "tta_used_by_pipeline" in (card["classifier"].get("metrics") or {}):  # the training's note of it
            card["classifier"]["metrics"]["tta_used_by_pipeline"] = tta
    if rate is not None:
        if "purifier" not in card:
            raise AtopError(f"--rate: {src} holds no purifier")
        try:
            card["purifier"]["rt"] = RTConfig.from_dict({**card["purifier"]["rt"], "rate": rate}).to_dict()
        except ValueError as e:
            raise AtopError(f"--rate: {e}") from None
    for name, value in (("samples", samples), ("mirror", mirror)):
        if value is not None:
            if "purifier" not in card:
                raise AtopError(f"--{name}: {src} holds no purifier")
            card["pipeline"] = {**(card.get("pipeline") or {}), name: value}
    if classifier is None:  # validate before writing (a swapped pair is validated by loading the result)
        modelio.load_pipeline(src) if "purifier" in card else modelio.load_classifier(src)
    out = Path(out)
    if out.exists() and not (out / modelio.CARD).is_file():  # only a model folder is replaced
        raise AtopError(f"--out {out} exists and is not a model folder (no {modelio.CARD}); it would be replaced "
                        "as a whole: name a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for kind in ("classifier", "purifier"):
            if kind not in card:
                continue
            name = card[kind].get("file", f"{kind}.safetensors")
            state = load_file(str(sources[kind] / name))
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name))
            card[kind]["sha256"] = modelio.sha256(tmp / name)
            card[kind]["weights_dtype"] = "float16" if half else "float32"
        card.pop("export", None)  # an export describes files that are not copied: export the packed folder again
        modelio.write_card(tmp, card)
        tmp.chmod(0o755)  # mkdtemp makes 0700: a service running as another user must read the folder
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if "purifier" in card:
        modelio.load_pipeline(out)
    return card


def swap_classifier(card: dict, src: Path, other: Path) -> dict:
    """``card`` with the classifier section of the model folder ``other`` (same classes) in place of its own."""
    from atop_serve.errors import AtopError

    if "purifier" not in card:
        raise AtopError(f"--classifier: {src} holds no purifier to pair with another classifier")
    new = modelio.read_card(other)
    if "classifier" not in new:
        raise AtopError(f"--classifier: {other} holds no classifier")
    if new.get("classes") != card.get("classes"):
        raise AtopError(f"--classifier: {other} has classes {new.get('classes')}, {src} has {card.get('classes')}")
    modelio.load_classifier(other)  # its weights load and match its architecture
    old = card["classifier"]
    card = {**card, "classifier": dict(new["classifier"])}
    card["pipeline"] = {**(card.get("pipeline") or {}), "classifier_swap": {
        "classifier_from": str(other), "replaced": {k: old.get(k) for k in ("arch", "sha256")},
        "replaced_metrics": old.get("metrics"), "purifier_metrics_then": card["purifier"].get("metrics"),
        "note": "the purifier was trained (AToP) against the replaced classifier, not this one"}}
    card["purifier"] = {k: v for k, v in card["purifier"].items() if k != "metrics"}
    for key in ("evaluation", "evaluation_of_earlier_config", "flops"):
        card.pop(key, None)  # they measured the replaced pipeline
    return card
