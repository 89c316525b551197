"""Report files of an evaluation: report.json, report.md, robust_vs_eps.png, examples.png (matplotlib, Agg)."""
from __future__ import annotations

import json
from pathlib import Path

_LINF = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack", "autoattack-rand")


def _fmt_params(p: dict) -> str:
    skip = {"norm", "random_start", "components", "omitted", "rho", "p_init", "version"}
    parts = []
    for k, v in p.items():
        if k in skip or isinstance(v, (list, dict)):
            continue
        if k in ("eps", "alpha") and isinstance(v, float) and p.get("norm") == "linf":
            v = f"{v * 255:.3g}/255"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    if p.get("omitted"):
        parts.append("omitted: " + "+".join(p["omitted"]))
    return ", ".join(parts)


def scored_by(report: dict) -> str:
    """What turned the (adversarial) images into predictions: the eager pipeline, an exported graph, or a service."""
    fp, cfg = report.get("fingerprint") or {}, report["config"]
    if cfg.get("url"):
        s = fp.get("service") or {}
        return (f"the running service at {cfg['url']} (model {s.get('model')}, {s.get('backend')} {s.get('graph')}, "
                f"variant {s.get('variant')}; images rounded to 8 bits, sent as PNG; its own fresh draws)")
    if cfg.get("graph", "torch") != "torch":
        return f"the exported graph {(fp.get('graph') or {}).get('file')} under ONNX Runtime (same draws as PyTorch)"
    return "the eager PyTorch pipeline" if report.get("rt") else "the eager PyTorch classifier"


def markdown(report: dict, images: list[str]) -> str:
    m = report["machine"]
    lines = [f"# Robustness of `{report['model']}`", "",
             f"- threat model: **{report['threat']}**: {report['threat_description']}"]
    if report.get("source"):
        lines.append(f"- transfer source: `{report['source']}`")
    if report.get("rt"):
        rt = report["rt"]
        lines.append(f"- random transform: {rt['kind']} (rate {rt['rate']}, sigma {rt['sigma']}, views {rt['views']})")
    cfg = report["config"]
    lines += [f"- n = {report['n']} class-balanced test images, seed {report['seed']}, batch {cfg['batch_size']}, "
              f"K = {report.get('samples') or cfg['samples']} purification(s) per prediction"
              + (", the odd-numbered ones on the mirrored image" if report.get("mirror") else "")
              + f", TTA {report.get('tta')}",
              f"- scored by: {scored_by(report)}",
              f"- machine: {m['device']} (torch {m['torch']}); wall time {report['wall_seconds']} s "
              f"(attacks computed this run or earlier: {report['compute_seconds']} s)",
              f"- command: `{report['command']}`", "",
              "| attack | parameters | accuracy | 95 % CI | time (s) |", "|---|---|---:|---:|---:|"]
    for key, r in report["results"].items():
        lo, hi = r["ci95"]
        t = f"{r['seconds']}" + (" (resumed)" if r.get("resumed") else "")
        lines.append(f"| {key} | {_fmt_params(r['params'])} | {100 * r['accuracy']:.1f} % | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {t} |")
    if report.get("sanity"):
        lines += ["", "## Sanity checks", "", "| check | result | detail |", "|---|---|---|"]
        for c in report["sanity"]:
            lines.append(f"| {c['check']} | {'PASS' if c['passed'] else '**FAIL**'} | {c['detail']} |")
    if images:
        lines += [""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def plot_eps(report: dict, path: Path) -> bool:
    """Robust accuracy vs l_inf epsilon, one line per attack (keys with their @eps part removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    clean = None
    for key, r in report["results"].items():
        if r["attack"] == "clean":
            clean = r
            continue
        eps = r["params"].get("eps")
        if r["attack"] not in _LINF or eps is None or eps > 64 / 255:
            continue
        name = "@".join(p for p in key.split("@") if not p.startswith("eps="))
        curves.setdefault(name, []).append((eps * 255, r["accuracy"], *r["ci95"]))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in sorted(curves.items()):
        pts.sort()
        e, a, lo, hi = (list(t) for t in zip(*pts))
        ax.errorbar(e, [100 * v for v in a], yerr=[[100 * (v - l) for v, l in zip(a, lo)],
                                                   [100 * (h - v) for v, h in zip(a, hi)]],
                    marker="o", capsize=3, label=name)
    if clean is not None:
        ax.axhline(100 * clean["accuracy"], ls="--", c="gray", label="clean")
    ax.set_xlabel("epsilon (x/255, l_inf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{Path(report['model']).name}: threat {report['threat']}, n={report['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_examples(report: dict, examples: dict, path: Path) -> str | None:
    """Rows: clean (label), adversarial (the classifier's prediction on it), purified (the defended
    prediction); for the attack named in the config, else the strongest attack the run made examples for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    want = report["config"].get("grid_attack")
    candidates = [k for k in examples if k in res and res[k]["attack"] != "clean"
                  and res[k]["params"].get("eps", 0) <= 64 / 255]
    if want and want in examples:
        key = want
    elif candidates:
        asked = {a.strip().lower() for a in report["config"]["attacks"]}
        user = [k for k in candidates if k in asked] or candidates
        key = min(user, key=lambda k: res[k]["accuracy"])
    else:
        return None
    ex, classes = examples[key], report["classes"]
    clean_pred = examples.get("clean", {}).get("pred")
    rows = [("clean", ex["clean"]), ("adversarial", ex["adversarial"])]
    if "purified" in ex:
        rows.append(("purified", ex["purified"]))
    g = ex["clean"].size(0)
    fig, axes = plt.subplots(len(rows), g, figsize=(1.3 * g, 1.5 * len(rows)), dpi=120, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for j in range(g):
            ax = axes[r][j]
            ax.imshow(imgs[j].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            y = int(ex["labels"][j])
            if name == "clean":
                p = int(clean_pred[j]) if clean_pred is not None else y
                title = classes[y] + ("" if clean_pred is None else f"\n-> {classes[p]}")
            elif name == "adversarial":
                p = int(ex["pred_classifier"][j]) if "purified" in ex else int(ex["pred"][j])
                title = f"f: {classes[p]}"
            else:
                p = int(ex["pred"][j])
                title = f"f(g): {classes[p]}"
            ax.set_title(title, fontsize=7, color="green" if p == y else "red")
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"{key} ({report['threat']} threat)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return key


def write_report(report: dict, out: Path, examples: dict | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plot_eps(report, out / "robust_vs_eps.png"):
        images.append("robust_vs_eps.png")
    if examples and plot_examples(report, examples, out / "examples.png"):
        images.append("examples.png")
    report = {k: v for k, v in report.items() if not k.startswith("_")}
    report["images"] = images
    slim = {**report, "results": {k: {kk: vv for kk, vv in r.items() if kk != "correct_mask"}
                                  for k, r in report["results"].items()}}
    (out / "report.json").write_text(json.dumps(slim, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report, images))


def _cell(rep: dict, attack: str) -> str:
    r = rep["results"].get(attack.strip().lower())
    return "-" if r is None else f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def table1_markdown(rows: list, cfg) -> str:
    """A row per model folder (with its threat model), a column per attack, accuracy % [95 % CI]."""
    attacks = list(cfg.attacks)
    lines = ["# Table 1 comparison (attacks crafted on each row's classifier; purifier rows then purify)", "",
             f"n = {cfg.n} class-balanced test images, seed {cfg.seed}; cells: accuracy % [95 % Wilson CI].", "",
             "| model | threat | " + " | ".join(attacks) + " |", "|" + "---|" * (len(attacks) + 2)]
    for name, threat, rep in rows:
        lines.append(f"| {name} | {threat} | " + " | ".join(_cell(rep, a) for a in attacks) + " |")
    if rows:
        lines += ["", f"machine: {rows[0][2]['machine']['device']}; command: `{rows[0][2]['command']}`"]
    return "\n".join(lines) + "\n"


def table7_markdown(rows: list, cfg) -> str:
    """One Markdown table: a row per (model folder, RT), a column per attack, accuracy % [95 % CI]."""
    attacks = list(cfg.attacks)
    head = "| model | RT | " + " | ".join(attacks) + " |"
    lines = ["# Table 7 grid (threat: classifier, attacks crafted on f and then purified)", "",
             f"n = {cfg.n} class-balanced test images, seed {cfg.seed}; cells: accuracy % [95 % Wilson CI].", "",
             head, "|" + "---|" * (len(attacks) + 2)]
    for name, kind, rep in rows:
        lines.append(f"| {name} | {kind} | " + " | ".join(_cell(rep, a) for a in attacks) + " |")
    if rows:
        lines += ["", f"machine: {rows[0][2]['machine']['device']}; command: `{rows[0][2]['command']}`"]
    return "\n".join(lines) + "\n"
