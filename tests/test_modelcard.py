"""MODEL_CARD.md: written with every card, every number read from the card, total over the cards that exist."""
from __future__ import annotations

import json
import subprocess
import sys

from atop_serve import modelcard, modelio


def test_written_with_the_card(tmp_path):
    card = {"name": "m", "classes": ["a", "b"], "classifier": {"arch": "airnet", "file": "classifier.safetensors"}}
    modelio.write_card(tmp_path, card)
    assert sorted(p.name for p in tmp_path.iterdir()) == [modelcard.FILE, modelio.CARD]  # no temporary left
    page = (tmp_path / modelcard.FILE).read_text()
    assert page == modelcard.render(card) and page.startswith("# m\n") and "no purifier yet" in page
    assert "## Measured accuracy" not in page and "## Export" not in page  # the card has neither: left out


def test_the_shipped_card_in_full():
    """Every evaluation's accuracy, interval and command, every training command and the export's check: from the
    card, in the page."""
    card = modelio.read_card()
    page = modelcard.render(card)
    for name, e in card["evaluation"].items():
        assert f"`{e['command']}`" in page, name
        for attack, a in e["accuracy"].items():
            lo, hi = a["ci95"]
            row = f"| {name} | {e['threat']} | {attack} |"
            line = next(x for x in page.splitlines() if x.startswith(row))
            assert f"| {100 * a['value']:.1f} % | [{100 * lo:.1f}, {100 * hi:.1f}] | {e['n']} |" in line, line
    pur = card["purifier"]
    for run in (card["classifier"]["training"], pur["pretraining"], *pur["atop_earlier"], pur["atop"]):
        assert f"`{run['command']}`: {run['wall_seconds'] / 60:.1f} min" in page
    assert f"K = {card['pipeline']['samples']}" in page and "mirrored" in page
    assert card["export"]["cpu_variant"]["shipped"] in page and f"`{card['export']['command']}`" in page
    worst = min(a["value"] for e in card["evaluation"].values() if e["threat"] == "pipeline"
                for k, a in e["accuracy"].items() if k != "clean")
    assert f"does far better: {100 * worst:.1f} %" in page  # the limitation quotes the card's weakest number


def test_total_over_partial_cards():
    base = json.loads((modelio.DEFAULT_MODEL_DIR / modelio.CARD).read_text())
    for drop in ("evaluation", "export", "flops", "pipeline", "purifier"):
        page = modelcard.render({k: v for k, v in base.items() if k != drop})
        assert page.startswith("# atop-default\n") and "\n\n\n" not in page, drop
    assert modelcard.render({}).startswith("# model\n")


def test_cli_check_and_rewrite(tmp_path):
    card = json.loads((modelio.DEFAULT_MODEL_DIR / modelio.CARD).read_text())
    (tmp_path / modelio.CARD).write_text(json.dumps(card))  # a folder from before MODEL_CARD.md existed
    no_torch = "import sys; sys.modules['torch'] = None; import atop_cli; atop_cli.main()"  # a serving install
    run = lambda *a: subprocess.run([sys.executable, "-c", no_torch, "card", "--model", str(tmp_path), *a],
                                    capture_output=True, text=True)
    r = run("--check")
    assert r.returncode == 1 and "missing: run `atop card" in r.stderr and not (tmp_path / modelcard.FILE).exists()
    r = run()
    assert r.returncode == 0 and (tmp_path / modelcard.FILE).read_text() == modelcard.render(card)
    assert run("--check").returncode == 0
    r = subprocess.run([sys.executable, "-c", no_torch, "card", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
