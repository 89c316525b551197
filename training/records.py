"""Evaluation records in model cards: ``atop record`` writes finished ``atop eval`` reports into a card.

A model card's ``evaluation`` maps a name to what one evaluation measured (threat, images, K, accuracies with
95 % intervals, the command, machine, commit and report path). ``record`` builds that entry from a report folder
and writes it only when the report measured *this* folder: the report's model fingerprint (the weights' sha256
and the card less its records, ``evaluate.folder_fingerprint``) must equal the folder's now, so a card never
carries numbers of other weights. Recording changes only the card's records, hence not the fingerprint: a
recorded card still matches its reports, and resumed evaluations stay valid.
"""
from __future__ import annotations

import os
from pathlib import Path

from atop_serve import modelio
from atop_serve.errors import AtopError

from .evaluate import folder_fingerprint

REPORT = "report.json"


def read_report(folder: Path) -> dict:
    """A report folder's report.json, checked enough to build an entry from it."""
    path = Path(folder) / REPORT
    if not path.is_file():
        raise AtopError(f"{folder} is not an `atop eval` report folder: {REPORT} is missing")
    report = modelio.read_json(path, "report", AtopError)
    missing = [k for k in ("threat", "n", "results", "command") if not isinstance(report, dict) or k not in report]
    if missing:
        raise AtopError(f"{path} is not an `atop eval` report: no {missing[0]!r} entry")
    return report


def check_measured(report: dict, folder: Path, where: str) -> None:
    """Raise unless ``report`` measured the weights and configuration now in ``folder``."""
    measured = (report.get("fingerprint") or {}).get("model")
    if not measured:
        raise AtopError(f"{where} holds no model fingerprint (made before `atop record` existed): rerun its "
                        f"`atop eval` command to record it")
    now = folder_fingerprint(folder)
    for name, sha in sorted({**measured.get("weights", {}), **now["weights"]}.items()):
        if measured.get("weights", {}).get(name) != now["weights"].get(name):
            raise AtopError(f"{where} did not measure the weights in {folder}: {name} differs (or is missing on "
                            f"one side); evaluate this folder and record that report")
    if measured.get("card_sha256") != now["card_sha256"]:
        raise AtopError(f"{where} measured the same weights under another configuration (the card's architecture, "
                        f"RT, TTA or K entries differ): evaluate {folder} as it is and record that report")
    graph = (report.get("fingerprint") or {}).get("graph")
    if graph:
        path = Path(folder) / graph["file"]
        if not path.is_file() or modelio.sha256(path) != graph["sha256"]:
            raise AtopError(f"{where} scored {graph['file']}, which {folder} no longer holds as measured: "
                            f"re-evaluate with the current graph")


def machine_text(machine: dict) -> str:
    """'<CPU>, <n> cores (<features>)' from a report's machine entry."""
    text = machine.get("device") or "unknown machine"
    if "cpu_flags" not in machine:  # a GPU, or flags that could not be read
        return text
    return f"{text} ({', '.join(machine['cpu_flags']) or 'no AVX2 or AVX-512'})"


def _shown_path(path: Path) -> str:
    """A path relative to the working directory where it lies under it (cards stay portable), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def card_entry(report: dict, folder: Path, note: str | None = None) -> dict:
    """The card's ``evaluation`` entry for a report read from ``folder``."""
    config = report.get("config") or {}
    accuracy = {key: {"value": r["accuracy"], "ci95": r["ci95"], "params": r.get("params", {})}
                for key, r in report["results"].items()}
    entry = {
        "threat": report["threat"], "n": report["n"], "seed": report.get("seed"), "samples": report.get("samples"),
        "mirror": report.get("mirror"), "rt": report.get("rt"), "tta": report.get("tta"),
        "graph": config.get("graph", "torch"), "command": report["command"], "model": report.get("model"),
        "accuracy": accuracy, "report": _shown_path(Path(folder) / REPORT),
        "attack_gradients": "bf16" if config.get("bf16") else "fp32",
        "machine": machine_text(report.get("machine") or {}), "git_commit": report.get("git_commit"),
        "finished": report.get("finished"), "wall_seconds": report.get("wall_seconds"),
    }
    if note:
        entry["note"] = note
    return entry


def record(model: Path, reports: list[Path], name: str | None = None, note: str | None = None) -> list[dict]:
    """Write each report folder's entry into ``model``'s card (after checking that it measured this folder).
    All reports are checked before the card is written, once, atomically. Returns what was written."""
    if not reports:
        raise AtopError("name at least one report folder")
    if name is not None and len(reports) > 1:
        raise AtopError("--name names one entry: give one report folder, or leave --name out (entries are named "
                        "after their report folders)")
    folder = modelio.resolve(model)
    card = modelio.read_card(folder)
    written, names = [], set()
    for rep_folder in reports:
        report = read_report(rep_folder)
        check_measured(report, folder, f"report {rep_folder}")
        key = name or Path(os.path.abspath(rep_folder)).name
        if key in names:
            raise AtopError(f"two report folders named {key!r}: record them one at a time with --name")
        names.add(key)
        entry = card_entry(report, rep_folder, note)
        written.append({"name": key, "replaced": key in card.get("evaluation", {}),
                        "accuracy": {k: v["value"] for k, v in entry["accuracy"].items()}})
        card.setdefault("evaluation", {})[key] = entry
    modelio.write_card(folder, card)
    return written
