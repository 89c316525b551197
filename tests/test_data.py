"""Data layer: both formats, the error cases, the cache, batched augmentation, and the `atop data` CLI."""
from __future__ import annotations

import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from atop_serve.errors import DataError
from training.data import augment, load_cifar10, load_split

from ._png import png_rgb
from .conftest import DATA_ROOT, needs_data

CLASSES = ["cat", "dog", "frog"]


def _folder(root, per_class=4, size=32, classes=CLASSES, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:04d}.png")
    return root


def _official(root):
    """A miniature cifar-10-batches-py folder in the official pickle layout."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 5)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOP_CACHE", str(tmp_path / "cache"))


def test_folder_loader(tmp_path):
    train, test = load_cifar10(_folder(tmp_path / "ds"))
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == CLASSES and train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(test) == 12
    # pixels survive exactly (PNG is lossless)
    first = np.asarray(Image.open(tmp_path / "ds" / "train" / "cat" / "0000.png"))
    assert np.array_equal(train.images[0].permute(1, 2, 0).numpy(), first)


def test_folder_resizes_other_sizes(tmp_path):
    train, _ = load_cifar10(_folder(tmp_path / "ds", size=48))
    assert train.images.shape[1:] == (3, 32, 32)


def test_official_format(tmp_path):
    d = _official(tmp_path)
    for root in (d, tmp_path):  # the batches folder itself, or its parent
        train, test = load_cifar10(root)
        assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (5, 3, 32, 32)
        assert train.classes[0] == "airplane" and len(train.classes) == 10


def test_cache_is_used_and_invalidated(tmp_path):
    root = _folder(tmp_path / "ds")
    a = load_split(root, "train")
    caches = list((tmp_path / "cache").glob("train-*.npz"))
    assert len(caches) == 1
    b = load_split(root, "train")
    assert torch.equal(a.images, b.images)
    # changing a file changes the key: the source is re-read
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "0000.png")
    time.sleep(0.01)
    c = load_split(root, "train")
    assert c.images[0].sum() == 0
    assert len(list((tmp_path / "cache").glob("train-*.npz"))) == 2


def test_concurrent_cache_writers_do_not_collide(tmp_path, monkeypatch):
    """torchrun's ranks decode a cold cache at once: a rival writing the same cache between this process's
    write and its rename (simulated here, deterministically) must not make either fail or leave debris."""
    root = _folder(tmp_path / "ds")
    real_savez, rivals = np.savez, []

    def savez_with_a_rival(path, **arrays):
        real_savez(path, **arrays)
        if not rivals:  # once: another process decodes, writes and renames its own copy into place now
            rivals.append(None)
            rivals[0] = load_split(root, "train")

    monkeypatch.setattr(np, "savez", savez_with_a_rival)
    mine = load_split(root, "train")
    assert len(rivals) == 1 and torch.equal(mine.images, rivals[0].images)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].startswith("train-") and files[0].count(".") == 1, files
    assert torch.equal(load_split(root, "train").images, mine.images)  # from the cache now


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "cut-png", "mismatch", "empty-class"])
def test_errors_name_the_problem(tmp_path, case):
    root = tmp_path / "ds"
    if case == "missing":
        expect = "does not exist"
    elif case == "empty":
        (root / "train").mkdir(parents=True)
        expect = "no class folders"
    elif case == "corrupt":
        _folder(root)
        (root / "train" / "dog" / "0002.png").write_bytes(b"not an image at all")
        expect = "0002.png"
    elif case == "cut-png":  # its pixel data ends cleanly after 16 of 32 rows: Pillow alone reads it, half black
        _folder(root)
        cut = png_rgb(np.full((32, 32, 3), 200, np.uint8), keep_bytes=16 * (1 + 32 * 3))
        (root / "train" / "dog" / "0003.png").write_bytes(cut)
        expect = "0003.png: the PNG's pixel data ends early"
    elif case == "mismatch":
        _folder(root, splits=("train",))
        _folder(root, splits=("test",), classes=["cat", "dog", "horse"])
        expect = "horse"
    else:
        _folder(root)
        (root / "train" / "zebra").mkdir()
        expect = "zebra"
    with pytest.raises(DataError, match=expect):
        load_cifar10(root)


@pytest.mark.parametrize("case", ["labels-short", "label-out-of-range", "batch-not-a-dict", "meta-not-a-dict"])
def test_official_format_inconsistent_batches_are_refused(tmp_path, case):
    """A batch whose labels do not match its images, or a pickle of another shape, is a DataError naming the file,
    not a dataset `atop data` reports as valid (or a TypeError traceback)."""
    d = _official(tmp_path)
    name, content = {"labels-short": ("test_batch", {b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3]}),
                     "label-out-of-range": ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}),
                     "batch-not-a-dict": ("data_batch_2", [1, 2, 3]),
                     "meta-not-a-dict": ("batches.meta", [1, 2, 3])}[case]
    with open(d / name, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError, match=name):
        load_cifar10(d)


@pytest.mark.parametrize("size", ["0", "100000"])  # 100000: each image would take 30 GB (it hung, allocating)
def test_cli_data_rejects_a_size_out_of_range(tmp_path, size):
    r = subprocess.run([sys.executable, "-m", "atop_cli", "data", str(_folder(tmp_path / "ds")), "--size", size],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--size" in r.stderr and "Traceback" not in r.stderr


def test_dangling_link_in_a_class_folder_is_a_data_error(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "train" / "dog" / "9999.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match="9999.png"):
        load_cifar10(root)


def test_cache_location_that_is_a_file_only_warns(tmp_path, monkeypatch, capsys):
    """$ATOP_CACHE naming a file: the cache cannot be written, the data still loads (was: NotADirectoryError from
    removing the temporary file that was never made)."""
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("ATOP_CACHE", str(tmp_path / "not-a-folder"))
    train = load_split(_folder(tmp_path / "ds"), "train")
    assert len(train) == 12 and "could not cache" in capsys.readouterr().err


def test_cli_error_is_one_line_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "atop_cli", "data", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_data_reports_counts(tmp_path):
    root = _folder(tmp_path / "ds")
    r = subprocess.run([sys.executable, "-m", "atop_cli", "data", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"train": 12' in r.stdout and '"format": "folder"' in r.stdout


def test_augment_is_batched_deterministic_and_a_translation():
    x = torch.rand(64, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # with no flip and no translation, augment is the identity
    assert torch.equal(augment(x, torch.Generator(), pad=0, flip=False), x)
    # every output is a shifted (and maybe flipped) copy: the centre 28x28 appears in the padded source
    c = augment(x, torch.Generator().manual_seed(1), pad=2, flip=False)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(4):
        found = any(torch.equal(c[i], pad[i, :, dy : dy + 32, dx : dx + 32]) for dy in range(5) for dx in range(5))
        assert found


@needs_data()
def test_real_dataset_counts():
    train, test = load_cifar10(DATA_ROOT)
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.labels.bincount().tolist() == [5000] * 10
    sub = test.balanced_subset(1000)
    assert sub.labels.bincount().tolist() == [100] * 10


def test_cli_ctrl_c_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside a command: typer turned it into a silent exit 130; main() now says so (no traceback)."""
    import atop_cli
    import training.data

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.data, "load_cifar10", interrupted)
    monkeypatch.setattr(sys, "argv", ["atop", "data", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip() == "interrupted", err
