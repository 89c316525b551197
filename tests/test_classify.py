"""`atop classify` (atop_serve/offline.py): files on disk through the service's decoding and engine, without a
server and without torch; unreadable files reported per row; --out written completely or not at all."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atop_serve import imageio, modelio
from atop_serve.engine import load_engine
from atop_serve.errors import DataError
from atop_serve.offline import AtomicFile, find_images

REPO = Path(__file__).resolve().parents[1]
# the CLI as a serving-only install runs it: torch unimportable
NO_TORCH_CLI = "import sys; sys.modules['torch'] = None; import atop_cli; sys.argv[0] = 'atop'; atop_cli.main()"


def atop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH_CLI, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder tree of images in several formats and sizes, three unreadable files and one that is no image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for name, shape in (("a.png", (32, 32, 3)), ("b.jpg", (48, 64, 3)), ("sub/c.webp", (32, 32, 3)),
                        ("sub/d.PNG", (20, 20, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    (root / "bad.jpg").write_bytes(b"not an image at all")
    (root / "empty.png").write_bytes(b"")
    (root / "trunc.png").write_bytes((root / "a.png").read_bytes()[:200])
    (root / "notes.txt").write_text("skipped: not an image suffix")
    return root


def test_find_images_walks_folders_and_refuses_bad_paths(photos, tmp_path):
    names = [p.relative_to(photos).as_posix() for p in find_images([photos])]
    assert names == ["a.png", "b.jpg", "bad.jpg", "empty.png", "sub/c.webp", "sub/d.PNG", "trunc.png"]
    assert find_images([photos / "notes.txt"]) == [photos / "notes.txt"]  # a named file is always tried
    (tmp_path / "none").mkdir()
    for bad, msg in ((tmp_path / "none", "no image files"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(DataError, match=msg):
            find_images([bad])


def test_classify_matches_the_engine_and_reports_unreadable_files(photos):
    """Seeded answers equal the engine's in-process classification of the same decoded pixels (what /classify
    computes for that seed); unreadable files get a row with their error; exit status 1; no torch."""
    r = atop("classify", photos, "--format", "jsonl", "--seed", 7, "--samples", 2, "--batch-size", 3)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "4 of 7 files classified, 3 could not be read" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(row["file"]).name for row in rows] == ["a.png", "b.jpg", "bad.jpg", "empty.png", "c.webp",
                                                         "d.PNG", "trunc.png"]
    errors = {Path(row["file"]).name: row["error"] for row in rows if "error" in row}
    assert set(errors) == {"bad.jpg", "empty.png", "trunc.png"}
    assert "not an image" in errors["bad.jpg"] and "empty" in errors["empty.png"] and "truncated" in errors["trunc.png"]
    good = [row for row in rows if "error" not in row]
    engine = load_engine(modelio.resolve("default"), threads=1)
    pixels = np.stack([imageio.decode(Path(row["file"]).read_bytes()) for row in good])
    expected = engine.classify(pixels, 2, [7] * len(good))
    for row, want in zip(good, expected):
        got = np.array([row["probabilities"][c] for c in engine.classes])
        assert row["samples"] == 2 and row["label"] == engine.classes[int(want.argmax())]
        np.testing.assert_allclose(got, want, atol=2e-6)
    again = atop("classify", photos / "a.png", "--format", "jsonl", "--seed", 7, "--samples", 2)
    assert again.returncode == 0 and json.loads(again.stdout) == good[0]  # seeded: reproducible


def test_out_file_is_complete_or_untouched(photos, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("an earlier run's results\n")
    for args, msg in (((tmp_path / "nope",), "does not exist"), ((photos, "--format", "xml"), "valid: table, csv"),
                      ((photos, "--model", tmp_path), "not a model folder"),
                      ((photos, "--threads", 100000), "--threads")):  # 100000: hung creating threads
        r = atop("classify", *args, "--out", out)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert out.read_text() == "an earlier run's results\n"
    r = atop("classify", photos / "a.png", photos / "sub", "--format", "csv", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "3 of 3 files classified" in r.stderr
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [Path(t["file"]).name for t in table] == ["a.png", "c.webp", "d.PNG"]
    classes = modelio.read_card(modelio.resolve("default"))["classes"]
    for t in table:
        probs = np.array([float(t[c]) for c in classes])
        assert abs(probs.sum() - 1) < 1e-4 and t["label"] == classes[int(probs.argmax())] and t["error"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary file left behind


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        with AtomicFile(out) as f:
            f.write("half a result")
            raise RuntimeError("interrupted")
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
    with pytest.raises(DataError, match="is a folder"):
        AtomicFile(tmp_path)


def test_score_against_class_folders(tmp_path):
    """--score: files in folders named after a class are scored against that name (the summary agrees with the
    rows); files elsewhere and unreadable ones are counted apart."""
    rng = np.random.default_rng(1)
    for folder, n in (("cat", 3), ("ship", 2), ("misc", 1)):
        (tmp_path / "set" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "set" / folder / f"{i}.png")
    (tmp_path / "set" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = atop("classify", tmp_path / "set", "--format", "jsonl", "--seed", 0, "--score")
    assert r.returncode == 1, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    labelled = [row for row in rows if "label" in row and Path(row["file"]).parent.name in ("cat", "ship")]
    correct = sum(row["label"] == Path(row["file"]).parent.name for row in labelled)
    assert len(labelled) == 5
    assert (f"accuracy against the class folders: {100 * correct / 5:.2f} % ({correct} of 5); not scored: "
            "1 outside a class folder, 1 unreadable") in r.stderr
    r = atop("classify", tmp_path / "set" / "misc", "--score")
    assert r.returncode == 0 and "nothing to score" in r.stderr


def test_out_inside_the_model_folder_or_over_an_input_is_refused(photos, tmp_path):
    """--out naming a file of the model folder (its card.json) or one of the images being classified was replaced by
    the results; now refused, exit 2, before anything is written."""
    model = tmp_path / "model"
    model.mkdir()
    for p in modelio.resolve("default").iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    image = tmp_path / "a.png"
    image.write_bytes((photos / "a.png").read_bytes())
    for args, out in (((image, "--model", model), model / "card.json"), ((image,), image)):
        before = out.read_bytes()
        r = atop("classify", *args, "--out", out)
        assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert out.read_bytes() == before


def test_out_in_a_folder_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    """The folder is probed when --out is checked, before the model loads (was: a traceback opening the temporary
    file after the model had loaded)."""
    import builtins

    real_open = builtins.open

    def refusing_open(file, mode="r", *a, **kw):
        if "w" in mode and Path(file).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(DataError, match="cannot write"):
        AtomicFile(tmp_path / "r.csv")
    assert list(tmp_path.iterdir()) == []
