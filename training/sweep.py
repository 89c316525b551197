"""Sweep one parameter of the random transform of a model folder: clean vs robust accuracy, one plot.

    atop sweep-sigma --model runs/pur --sigmas 0,0.05,0.1,0.15,0.2,0.25 --out reports/sigma-sweep
    atop sweep-rate --model default --rates 0,0.05,0.1,0.15,0.25 --n 1000 --out reports/rate-sweep

``sigma`` is the RT noise level, ``rate`` the share of mask blocks missing; the model's other RT settings are
kept. Each point is an ordinary evaluation (``classifier`` threat by default: examples crafted on the
classifier, then purified), so every point is resumable and carries its 95 % interval; under the
``classifier`` threat the crafted examples do not depend on RT, so they are made once and shared by every
point (each point then differs only by the transform). Writes sweep.json, sweep.md and sweep.png into ``out``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from . import common
from .evaluate import EvalConfig, evaluate, validate

PARAMS = {"sigma": "RT noise sigma (images in [0, 1])", "rate": "RT mask rate (share of blocks missing)"}


def sweep_rt(folder, param: str, values: list[float], cfg: EvalConfig, out: Path, show_progress: bool = True) -> dict:
    if param not in PARAMS:
        raise ValueError(f"unknown RT parameter {param!r}; valid: {', '.join(PARAMS)}")
    for v in values:  # every point's arguments, before the first point's run
        validate(replace(cfg, **{param: v}))
    out.mkdir(parents=True, exist_ok=True)
    rows, adv_cache = [], {}
    for v in values:
        rep = evaluate(folder, replace(cfg, **{param: v}), show_progress=show_progress, out=out / f"{param}-{v:g}",
                       adv_cache=adv_cache)
        rows.append({param: v, **{k: {"accuracy": r["accuracy"], "ci95": r["ci95"]} for k, r in rep["results"].items()}})
    result = {"model": str(folder), "param": param, "threat": cfg.threat, "n": cfg.n, "attacks": list(cfg.attacks),
              "samples": rep["samples"], "mirror": rep.get("mirror"), "rows": rows, "command": common.command_line(), "machine": common.hardware(),
              "git_commit": common.git_commit()}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    keys = list(cfg.attacks)
    lines = [f"{param.capitalize()} sweep of `{folder}`, threat `{cfg.threat}`, n = {cfg.n}, K = {rep['samples']}"
             + (" (the odd-numbered samples on the mirrored image)" if rep.get("mirror") else "")
             + " (95 % Wilson intervals in sweep.json).",
             "", f"| {param} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r[param]:g} | " + " | ".join(f"{100 * r[k]['accuracy']:.1f}" for k in keys) + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[param] for r in rows]
    for k in keys:
        acc = [100 * r[k]["accuracy"] for r in rows]
        lo = [100 * r[k]["ci95"][0] for r in rows]
        hi = [100 * r[k]["ci95"][1] for r in rows]
        ax.plot(xs, acc, marker="o", label=k)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xlabel(PARAMS[param])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{param} sweep, {cfg.threat} threat, n={cfg.n}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return result
