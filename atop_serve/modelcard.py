"""A model folder's card for people: ``MODEL_CARD.md``, rendered from ``card.json`` (the card for programs).

``modelio.write_card`` writes both, so the Markdown can never disagree with the JSON: every number in it is
read from the card (training commands and wall times, evaluations with their 95 % intervals and commands,
the export's verification), and a section the card lacks (a folder fresh from training has no evaluation
and no export) is left out. ``atop card`` re-renders a folder written before this existed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .modelio import ONNX_FILE, OPT_ONNX_FILE, write_text_atomic

FILE = "MODEL_CARD.md"

_THREATS = {
    "bare": "the classifier alone, attacked directly: no purification (what AToP defends against)",
    "classifier": "attacks crafted on the classifier alone, then purified and classified (the paper's Table 7 "
                  "setting: the attacker does not differentiate through the purifier)",
    "pipeline": "full white box: attacks differentiate through the whole pipeline, purifier and random transform "
                "included, with gradients averaged over the random draws (EOT)",
}
_PAPER = ("Guang Lin, Chao Li, Jianhai Zhang, Toshihisa Tanaka, Qibin Zhao: Adversarial Training on Purification "
          "(AToP): Advancing Both Robustness and Generalization. ICLR 2024, arXiv:2401.16352.")
_SCORED_BY = {"torch": "PyTorch", "onnx": f"`{ONNX_FILE}`", "opt": f"`{OPT_ONNX_FILE}`"}


def _pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "?"


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "?"


def _minutes(s: Any) -> str:
    return f"{s / 60:.1f} min" if isinstance(s, (int, float)) else "?"


def _mflops(n: Any) -> str:
    return f"{n / 1e6:.0f} MFLOPs" if isinstance(n, (int, float)) else "?"


def _budget(params: dict) -> str:
    eps, norm = params.get("eps"), params.get("norm")
    if isinstance(params.get("budget"), (int, float)):  # StAdv: a bound on the flow field
        return f"flow {params['budget']:.3g}"
    if not isinstance(eps, (int, float)):
        return ""
    if norm == "linf":
        return f"l_inf {eps * 255:.3g}/255"
    return f"{norm or ''} {eps:.3g}".strip()


def _rt(rt: dict) -> str:
    kind = str(rt.get("kind", "?"))
    parts = [f"{rt.get('block', '?')}x{rt.get('block', '?')}-pixel blocks, {_pct(rt.get('rate'))} of them masked"]
    if kind in ("rt2", "rt3"):
        parts.append(f"Gaussian noise sigma {rt.get('sigma', '?')}")
    if kind == "rt3":
        parts.append(f"{rt.get('views', '?')} views mixed")
    return f"{kind.upper()}: " + ", ".join(parts)


def _run(rec: dict) -> str:
    """A training run in one line: its command, wall time, machine and commit."""
    facts = [_minutes(rec.get("wall_seconds")), f"on {rec.get('hardware', '?')}"]
    if rec.get("git_commit"):
        facts.append(f"git {rec['git_commit']}")
    if "classifier_unchanged" in rec:
        facts.append("classifier weights verified unchanged" if rec["classifier_unchanged"]
                     else "classifier weights CHANGED")
    return f"`{rec.get('command', '?')}`: " + ", ".join(facts)


def _overview(card: dict) -> list[str]:
    clf, pur, pipe = card.get("classifier") or {}, card.get("purifier"), card.get("pipeline") or {}
    classes = card.get("classes") or []
    size = (card.get("input") or {}).get("size", "?")
    rows = [("classes", f"{len(classes)}: " + ", ".join(map(str, classes))),
            ("input", f"{size}x{size} RGB; the service and `atop classify` resize other sizes"),
            ("classifier", f"`{clf.get('arch', '?')}`, {clf.get('weights_dtype', 'float32')} weights, test-time "
                           f"augmentation: {clf.get('tta', 'none')}")]
    if pur:
        rows.append(("purifier", f"`{pur.get('arch', '?')}`, {pur.get('weights_dtype', 'float32')} weights"))
        rows.append(("random transform (served)", _rt(pur.get("rt") or {})))
        k = pipe.get("samples", 1)
        mirror = ", the odd-numbered ones on the image mirrored left-right" if pipe.get("mirror") and k > 1 else ""
        rows.append(("purifications per prediction", f"K = {k}, class probabilities averaged{mirror}"))
    flops = card.get("flops") or {}
    if flops.get("purifier") and flops.get("classifier_single_pass"):
        rows.append(("forward cost per image", f"purifier {_mflops(flops['purifier'])} + classifier "
                                               f"{_mflops(flops['classifier_single_pass'])} per purification "
                                               f"(`{flops.get('command', '?')}`)"))
    files = ((card.get("export") or {}).get("files") or {})
    for name in ("classifier", "purifier"):
        part = card.get(name) or {}
        if part.get("file") and part["file"] not in files:
            files = {**files, part["file"]: {"sha256": part.get("sha256"), "role": f"{name} weights"}}
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if files:
        lines += ["", "| file | role | precision | size | sha256 |", "|---|---|---|---:|---|"]
        lines += [f"| `{f}` | {r.get('role', '')} | {r.get('precision', '')} | {_mb(r.get('bytes')) if 'bytes' in r else ''} "
                  f"| `{str(r.get('sha256', ''))[:16]}...` |" for f, r in files.items()]
    return lines


def _evaluation(card: dict) -> list[str]:
    ev = card.get("evaluation") or {}
    if not ev:
        return []
    card_k = (card.get("pipeline") or {}).get("samples", 1)
    lines = ["## Measured accuracy", "",
             "Accuracy in % with 95 % Wilson intervals, on class-balanced subsets of the CIFAR-10 test set (seed 0) "
             "unless n = 10,000. Each row names its run below, with the command that made it.", "",
             "| run | threat | attack | budget | accuracy | 95 % interval | n | K | scored by |",
             "|---|---|---|---|---:|---|---:|---:|---|"]
    for name, e in ev.items():
        for attack, a in (e.get("accuracy") or {}).items():
            lo, hi = (a.get("ci95") or [None, None])[:2]
            ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
            k = 1 if e.get("threat") == "bare" else e.get("samples") or card_k
            graph = e.get("graph") or "torch"
            lines.append(f"| {name} | {e.get('threat', '?')} | {attack} | {_budget(a.get('params') or {})} | "
                         f"{_pct(a.get('value'))} | {ci} | {e.get('n', '?')} | {k} | "
                         f"{_SCORED_BY.get(graph, graph)} |")
    lines += ["", "Threats: " + "; ".join(f"**{t}**: {d}" for t, d in _THREATS.items()
                                          if any(e.get("threat") == t for e in ev.values())) + ".", "",
              "Runs:", ""]
    for name, e in ev.items():
        note = f"; {e['note']}" if e.get("note") else ""
        lines.append(f"- **{name}** ({e.get('machine', '?')}, git {e.get('git_commit', '?')}): "
                     f"`{e.get('command', '?')}`{note}")
    earlier = card.get("evaluation_of_earlier_weights") or {}
    if earlier.get("entries"):
        lines += ["", f"`card.json` also keeps the {len(earlier['entries'])} evaluations of the weights this model replaced "
                      f"(`evaluation_of_earlier_weights`: {earlier.get('note', 'no note')})."]
    white = [(a.get("value"), attack, e.get("n")) for e in ev.values() if e.get("threat") == "pipeline"
             for attack, a in (e.get("accuracy") or {}).items() if attack != "clean"]
    if white:
        v, attack, n = min(white, key=lambda t: t[0])
        lines += ["", f"**Limitation.** Robustness holds against attacks crafted without the purifier. An attacker who "
                      f"differentiates through the whole pipeline does far better: {_pct(v)} under {attack} (n = {n}, "
                      f"threat `pipeline` above). Choose this defence knowing which attacker you face."]
    return lines


def _training(card: dict) -> list[str]:
    lines = ["## How it was trained", ""]
    clf = card.get("classifier") or {}
    tr = clf.get("training") or {}
    metrics = clf.get("metrics") or {}
    if tr:
        lines.append("Classifier:")
        lines.append("")
        lines.append(f"- {_run(tr)}")
        accs = [(k.removeprefix("test_acc_tta_"), v) for k, v in metrics.items() if k.startswith("test_acc_tta_")]
        if accs:
            lines.append(f"- test accuracy ({metrics.get('measured_on', '?')}), by test-time augmentation: "
                         + ", ".join(f"{k} {_pct(v)}" for k, v in accs)
                         + f"; the pipeline uses {metrics.get('tta_used_by_pipeline', clf.get('tta', 'none'))}")
        lines.append("")
    pur = card.get("purifier") or {}
    if pur.get("pretraining"):
        lines += ["Purifier pre-training (GAN + L1 reconstruction):", "", f"- {_run(pur['pretraining'])}", ""]
    stages = [*(pur.get("atop_earlier") or []), *([pur["atop"]] if pur.get("atop") else [])]
    if stages:
        lines += ["AToP fine-tuning (classifier frozen), in order:", ""]
        lines += [f"{i}. {_run(s)}" for i, s in enumerate(stages, 1)]
        lines.append("")
    swap = (card.get("pipeline") or {}).get("classifier_swap") or {}
    if swap.get("note"):
        lines += [f"Note: {swap['note']} (classifier taken from `{swap.get('classifier_from', '?')}`).", ""]
    return lines if len(lines) > 2 else []


def _export(card: dict) -> list[str]:
    ex = card.get("export") or {}
    if not ex:
        return []
    lines = ["## Export", "", f"`{ex.get('command', '?')}` ({ex.get('created', '?')}, {ex.get('seconds', '?')} s): "
                              f"{', '.join(ex.get('formats') or [])}, opset {ex.get('opset', '?')}.", ""]
    for name, v in (ex.get("verification") or {}).items():
        lines.append(f"- `{name}` against PyTorch on {v.get('n', '?')} test images with identical draws: max |difference| "
                     f"{v.get('max_abs_diff', float('nan')):.2g}, top-1 agreement {_pct(v.get('top1_agreement'))}, "
                     f"{'passed' if v.get('passed') else 'FAILED'}")
    cpu = ex.get("cpu_variant") or {}
    shipped = cpu.get("shipped")
    if shipped and shipped in (cpu.get("candidates") or {}):
        c = cpu["candidates"][shipped]
        clean, robust = c.get("clean") or {}, c.get("robust") or {}
        lines.append(f"- faster CPU variant `{shipped}` (`{OPT_ONNX_FILE}`): {c.get('speedup', '?')}x fp32's speed; "
                     f"clean {_pct(clean.get('accuracy'))} (fp32 {_pct(clean.get('accuracy_fp32'))}), robust "
                     f"{_pct(robust.get('accuracy'))} (fp32 {_pct(robust.get('accuracy_fp32'))}), K = {cpu.get('k', '?')}, "
                     f"n = {clean.get('n', '?')}")
    return lines + [""]


def render(card: dict) -> str:
    """``card.json``'s content as Markdown. Total over cards: missing sections are left out, never guessed."""
    name = card.get("name") or "model"
    pur = card.get("purifier")
    lines = [f"# {name}", "",
             "<!-- Written from card.json by atop_serve.modelcard whenever the card is written: edit the card "
             "(or re-run the command that wrote it), not this file. -->", ""]
    if pur:
        lines += ["An adversarially robust image classifier: AToP (adversarial training on purification). A random "
                  "transform destroys most of an adversarial perturbation, the purifier g (an inpainting generator) "
                  "repairs the image, the classifier f labels the repair: `f(g(RT(x)))`. g was fine-tuned "
                  "adversarially with f frozen. Method: " + _PAPER, ""]
    else:
        lines += ["A classifier folder (no purifier yet): `atop train purifier` and `atop train atop` make it a "
                  "purified pipeline.", ""]
    lines += _overview(card) + [""]
    lines += _evaluation(card) + [""] if card.get("evaluation") else []
    lines += _training(card)
    lines += _export(card)
    lines += ["## Use", "", "```bash", "bentoml serve                                   # from the repository, "
              "ATOP_MODEL=<this folder> for another folder", "curl -F image=@cat.jpg http://localhost:3000/classify",
              "atop classify photos/                           # files on disk, no server", "```", "",
              "```python", "from atop_serve import load_pipeline", "pipe = load_pipeline(\"<this folder>\")"
              "   # torch.nn.Module: images in [0, 1] (N, 3, 32, 32) -> logits", "```", ""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def write(folder: Path, card: dict) -> Path:
    """Render ``card`` into ``folder/MODEL_CARD.md`` (atomically); returns the page's path."""
    page = Path(folder) / FILE
    write_text_atomic(page, render(card))
    return page
