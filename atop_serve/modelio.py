"""Model folders: ``card.json`` + safetensors weights (+ the exported ``pipeline.onnx``).

    <folder>/card.json               architectures, classes, RT config, provenance, measured metrics
    <folder>/MODEL_CARD.md           the card rendered for people (``modelcard``), written with it
    <folder>/classifier.safetensors  classifier weights
    <folder>/purifier.safetensors    purifier weights (absent in a classifier-only folder)
    <folder>/pipeline.onnx           the exported graph (``atop export``), plus optional pipeline.opt.onnx
    <folder>/classifier.onnx         the bare classifier f alone (``atop export``), for the service's attack demo;
                                     its weights are external data: byte ranges of classifier.safetensors

Weights are only ever read with safetensors: a model folder can never run code through pickle.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import RTConfig
from .errors import ModelError

CARD = "card.json"
CLASSIFIER_FILE = "classifier.safetensors"
PURIFIER_FILE = "purifier.safetensors"
ONNX_FILE = "pipeline.onnx"  # the exported fp32 graph every serving folder holds (see docs/export.md)
OPT_ONNX_FILE = "pipeline.opt.onnx"  # optional faster CPU variant, shipped only when the card's export section says so
CLASSIFIER_ONNX_FILE = "classifier.onnx"  # bare classifier f (images -> logits), weights read from CLASSIFIER_FILE
TRT_FILE = "pipeline.trt.ep"  # optional Torch-TensorRT program (needs torch + torch_tensorrt + a GPU to load)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"


def resolve(path=None) -> Path:
    p = DEFAULT_MODEL_DIR if path in (None, "", "default") else Path(path)
    if not p.is_dir():
        raise ModelError(f"model folder {p} does not exist")
    return p


def read_json(p: Path, what: str, error: type[Exception] = ModelError):
    """The JSON in file ``p``; a file that is not JSON raises ``error`` naming ``what`` and the file."""
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt {what} {p}: {e}") from None


def read_card(path=None) -> dict:
    p = resolve(path) / CARD
    if not p.exists():
        raise ModelError(f"{p.parent} is not a model folder: {CARD} is missing")
    card = read_json(p, "model card")
    if not isinstance(card, dict) or "classifier" not in card or "classes" not in card:
        raise ModelError(f"model card {p} lacks the 'classifier' or 'classes' entry")
    return card


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers see the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_card(path, card: dict) -> None:
    """Write ``card.json`` and its Markdown rendering ``MODEL_CARD.md`` (``modelcard``), each atomically, the
    Markdown first: a folder's card.json is never newer than the page people read."""
    from . import modelcard

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    modelcard.write(p, card)
    write_text_atomic(p / CARD, json.dumps(card, indent=2) + "\n")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(module, path) -> str:
    """Save a module's state dict as safetensors (atomic); returns its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return sha256(path)


def load_weights(module, path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights file {path} is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"corrupt weights file {path}: {e}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ModelError(f"{path} does not match architecture {type(module).__name__}: {' '.join(first)}") from None


def _build(kind: str, entry: dict, folder: Path, num_classes: int):
    from .registry import create_classifier, create_purifier

    arch = entry.get("arch")
    if not arch:
        raise ModelError(f"model card in {folder} names no {kind} architecture")
    net = create_classifier(arch, num_classes=num_classes) if kind == "classifier" else create_purifier(arch)
    load_weights(net, folder / entry.get("file", CLASSIFIER_FILE if kind == "classifier" else PURIFIER_FILE))
    return net.eval()


def load_classifier(path=None, tta: str | None = None):
    """The classifier of a model folder (default: the shipped one) in eval mode, with the test-time
    augmentation its card names (override with ``tta``): images in [0, 1] -> logits."""
    from .pipeline import TTAClassifier

    folder = resolve(path)
    card = read_card(folder)
    net = _build("classifier", card["classifier"], folder, len(card["classes"]))
    return TTAClassifier(net, tta or card["classifier"].get("tta", "none")).eval()


def load_purifier(path=None):
    folder = resolve(path)
    card = read_card(folder)
    if "purifier" not in card:
        raise ModelError(f"model folder {folder} holds no purifier")
    try:
        rt = RTConfig.from_dict(card["purifier"].get("rt") or {})
    except (TypeError, ValueError) as e:
        raise ModelError(f"corrupt model card in {folder}: bad RT config: {e}") from None
    return _build("purifier", card["purifier"], folder, 0), rt


def default_samples(card: dict) -> int:
    """The purification samples K a model folder recommends (its card's ``pipeline.samples``; 1 if unset)."""
    k = (card.get("pipeline") or {}).get("samples", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ModelError(f"model card: pipeline.samples must be a positive integer, got {k!r}")
    return k


def mirrored(card: dict) -> bool:
    """Whether a model folder's odd-numbered purification samples see the mirrored image (``pipeline.mirror``)."""
    m = (card.get("pipeline") or {}).get("mirror", False)
    if not isinstance(m, bool):
        raise ModelError(f"model card: pipeline.mirror must be true or false, got {m!r}")
    return m


def load_pipeline(path=None, samples: int | None = None, tta: str | None = None, mirror: bool | None = None):
    """The purified classifier f(g(RT(x))) of a model folder (default: the shipped one), in eval mode, averaging
    ``samples`` purifications per prediction (default: the K the folder's card recommends), the odd-numbered of
    them on the mirrored image where ``mirror`` (default: the card's ``pipeline.mirror``) says so."""
    from .pipeline import PurifiedClassifier

    card = read_card(resolve(path))
    if samples is None:
        samples = default_samples(card)
    if mirror is None:
        mirror = mirrored(card)
    purifier, rt = load_purifier(path)
    for p in purifier.parameters():
        p.requires_grad_(False)
    classifier = load_classifier(path, tta)
    for p in classifier.parameters():
        p.requires_grad_(False)
    return PurifiedClassifier(purifier, classifier, rt, samples, mirror).eval()


def check_external_data(folder, card: dict, graph: str) -> None:
    """The safetensors files an exported ``graph`` reads its weights from (ONNX external data) must be the ones
    it was exported with: a changed file would silently change the served function."""
    record = ((card.get("export") or {}).get("files") or {}).get(graph) or {}
    for name, digest in ((record.get("external_data") or {}).get("files") or {}).items():
        weights = Path(folder) / name
        if not weights.exists() or sha256(weights) != digest:
            raise ModelError(f"{weights.name}, which {graph} reads its weights from, is missing or differs from "
                             "the exported one (re-export with `atop export`)")
