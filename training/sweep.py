"""Sweep the RT noise level sigma of one model folder: clean vs robust accuracy, one plot.

    atop sweep-sigma --model runs/pur --sigmas 0,0.05,0.1,0.15,0.2,0.25 --out reports/sigma-sweep

Each sigma is an ordinary evaluation (``classifier`` threat by default: PGD on the classifier, then
purified), so every point is resumable and carries its 95 % interval. Writes sweep.json, sweep.md and
sweep.png into ``out``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from . import common
from .evaluate import EvalConfig, evaluate


def sweep_sigma(folder, sigmas: list[float], cfg: EvalConfig, out: Path, show_progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in sigmas:
        rep = evaluate(folder, replace(cfg, sigma=s), show_progress=show_progress, out=out / f"sigma-{s:g}")
        rows.append({"sigma": s, **{k: {"accuracy": r["accuracy"], "ci95": r["ci95"]} for k, r in rep["results"].items()}})
    result = {"model": str(folder), "threat": cfg.threat, "n": cfg.n, "attacks": list(cfg.attacks), "rows": rows,
              "command": common.command_line(), "machine": common.hardware(), "git_commit": common.git_commit()}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    keys = list(cfg.attacks)
    lines = [f"Sigma sweep of `{folder}`, threat `{cfg.threat}`, n = {cfg.n} (95 % Wilson intervals in sweep.json).",
             "", "| sigma | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['sigma']:g} | " + " | ".join(f"{100 * r[k]['accuracy']:.1f}" for k in keys) + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["sigma"] for r in rows]
    for k in keys:
        acc = [100 * r[k]["accuracy"] for r in rows]
        lo = [100 * r[k]["ci95"][0] for r in rows]
        hi = [100 * r[k]["ci95"][1] for r in rows]
        ax.plot(xs, acc, marker="o", label=k)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xlabel("RT noise sigma (images in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"sigma sweep, {cfg.threat} threat, n={cfg.n}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return result
