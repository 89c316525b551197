"""Registration of a serving folder in the BentoML model store, and listing of what is there.

An entry holds exactly the serving folder's files (``card.json``, ``pipeline.onnx``, optional variants)
under ``ref.path``; its metadata repeats what a deployment needs to know without opening the files (classes,
graph contract, RT config, metrics, sha256 of every file, exporter versions) and its labels are short strings
for filtering. The store lives at ``$BENTOML_HOME/models`` (default ``~/bentoml/models``).

    import bentoml
    ref = bentoml.models.get("atop-default:latest")
    folder = ref.path          # card.json + pipeline.onnx: load like any serving folder
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from atop_serve.errors import ExportError


def _bentoml():
    # An offline export tool has no business reporting usage: BentoML's analytics stay off unless asked for.
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        import bentoml
    except ImportError as e:  # pragma: no cover
        raise ExportError(f"BentoML is not installed ({e}); export with --no-register or pip install bentoml") from None
    return bentoml


def register(folder: Path, name: str, metadata: dict, labels: dict[str, str]) -> str:
    """Copy the files of ``folder`` into a new store entry ``name:<version>``; returns the tag as a string."""
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException

    try:
        with bentoml.models.create(name, labels=labels, metadata=json.loads(json.dumps(metadata))) as ref:
            for f in sorted(Path(folder).iterdir()):
                if f.is_file():
                    shutil.copy2(f, Path(ref.path) / f.name)
        return str(ref.tag)
    except (BentoMLException, ValueError) as e:
        raise ExportError(f"could not register {name!r} in the BentoML store: {e}") from None


def delete(tag: str) -> None:
    _bentoml().models.delete(tag)


def get(tag: str):
    """The store entry for ``name:version`` (or ``name:latest``)."""
    bentoml = _bentoml()
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise ExportError(f"no model {tag!r} in the BentoML store") from None


def list_entries(name: str | None = None) -> list[dict]:
    """Every store entry (or every version of ``name``), newest first, as plain dicts."""
    bentoml = _bentoml()
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:
        return []
    rows = []
    for m in sorted(models, key=lambda m: m.info.creation_time, reverse=True):
        meta = dict(m.info.metadata or {})
        rows.append({"tag": str(m.tag), "path": str(m.path), "bytes": int(m.file_size),
                     "created": m.info.creation_time.isoformat(timespec="seconds"),
                     "labels": dict(m.info.labels or {}), "metrics": meta.get("metrics", {})})
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics_line(metrics: dict) -> str:
    parts = []
    ex = metrics.get("export", {})
    if "clean_accuracy" in ex:
        parts.append(f"clean acc {100 * ex['clean_accuracy']:.2f} % (export check, n={ex.get('n')})")
    if "max_abs_diff" in ex:
        parts.append(f"verify max|diff| {ex['max_abs_diff']:.1e}, top-1 {100 * ex.get('top1_agreement', 0):.1f} %")
    for k, v in sorted(metrics.get("source", {}).items()):
        parts.append(f"{k} {v:.4g}")
    return "; ".join(parts) or "-"


def format_listing(rows: list[dict]) -> str:
    if not rows:
        return "no atop models in the BentoML store"
    lines = [f"{'TAG':40} {'SIZE':>9}  {'CREATED':25}  METRICS"]
    for r in rows:
        lines.append(f"{r['tag']:40} {_size(r['bytes']):>9}  {r['created']:25}  {_metrics_line(r['metrics'])}")
    return "\n".join(lines)
