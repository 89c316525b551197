"""CIFAR-10 (or any image-folder dataset) as uint8 tensors in memory.

Sources, all read into the same ``Dataset`` (images uint8 (N, 3, H, W), labels int64 (N,), class names):
  1. the official python format: a ``cifar-10-batches-py/`` folder (``data_batch_1..5``, ``test_batch``,
     ``batches.meta``), as torchvision downloads it;
  2. an image-folder tree ``<root>/<split>/<class>/<file>`` (e.g. ``../shared/data/cifar10-jpeg``); images of
     another size are resized (bicubic, antialiased) to ``size``;
  3. ``download=True``: the official archive, MD5-checked, where a network exists.

Decoded arrays are cached under ``$ATOP_CACHE`` (default ``~/.cache/atop-serve``), keyed by the source's
file list, sizes and modification times, so a changed source is re-read and a second run loads in well
under a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atop_serve.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg"


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Dataset":
        idx = torch.as_tensor(idx)
        return Dataset(self.images[idx], self.labels[idx], self.classes, self.source)

    def balanced_subset(self, n: int, seed: int = 0) -> "Dataset":
        """A fixed, class-balanced subset of ``n`` images (the first n/C of each class after a seeded shuffle)."""
        per = n // len(self.classes)
        if per < 1:
            raise DataError(f"a class-balanced subset of {n} images needs at least {len(self.classes)}, one per class")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        idx = torch.cat([perm[self.labels[perm] == c][:per] for c in range(len(self.classes))])
        return self.subset(idx.sort().values)


def cache_dir() -> Path:
    return Path(os.environ.get("ATOP_CACHE", Path.home() / ".cache" / "atop-serve"))


def default_data_root() -> Path:
    """``$ATOP_DATA`` if set, else ``../shared/data/cifar10-jpeg`` beside the checkout."""
    return Path(os.environ.get("ATOP_DATA", DEFAULT_DATA))


# ------------------------------------------------------------------------------------------- detection
def detect_format(root: Path) -> str:
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"dataset path {root} does not exist; give an image-folder tree (<root>/<split>/<class>/*.jpg), "
            "a cifar-10-batches-py folder, or --download"
        )
    if (root / "batches.meta").exists() or (root / "cifar-10-batches-py" / "batches.meta").exists():
        return "cifar-python"
    return "folder"


def load_split(root: str | Path, split: str = "train", size: int = 32, use_cache: bool = True) -> Dataset:
    """Load ``split`` ('train' or 'test') from either format."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if detect_format(root) == "cifar-python":
        if not (root / "batches.meta").exists():
            root = root / "cifar-10-batches-py"
        return _load_cifar_python(root, split)
    return _load_folder(root, split, size, use_cache)


def load_cifar10(root: str | Path | None = None, size: int = 32, download: bool = False) -> tuple[Dataset, Dataset]:
    """(train, test). ``root`` None means the default data root; checks that both splits share their classes."""
    if download:
        root = download_cifar10(root or cache_dir() / "downloads")
    root = Path(root) if root is not None else default_data_root()
    train, test = load_split(root, "train", size), load_split(root, "test", size)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"class folders differ between train and test in {root}: only in train {only_train}, only in test {only_test}"
        )
    return train, test


# ------------------------------------------------------------------------------------- official format
def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"missing CIFAR-10 batch file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")  # the official format is a pickle; read only from the user's own files
    except Exception as e:  # noqa: BLE001
        raise DataError(f"corrupt CIFAR-10 batch file {path}: {e}") from None


def _load_cifar_python(root: Path, split: str) -> Dataset:
    meta = _unpickle(root / "batches.meta")
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt CIFAR-10 batch file {root / 'batches.meta'}: no list of label_names ({e})") from None
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        try:
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"labels"], dtype=np.int64).reshape(-1)
            if len(y) != len(x):
                raise ValueError(f"{len(x)} images but {len(y)} labels")
            if len(y) and not (0 <= y.min() and y.max() < len(classes)):
                raise ValueError(f"labels outside 0..{len(classes) - 1}, the classes of batches.meta")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"corrupt CIFAR-10 batch file {root / name}: {e}") from None
        xs.append(x)
        ys.append(y)
    return Dataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes, str(root))


def download_cifar10(dest: str | Path) -> Path:
    """Fetch and unpack the official archive (MD5-checked). Offline, fail naming the alternatives."""
    import urllib.request

    dest = Path(dest)
    target = dest / "cifar-10-batches-py"
    if (target / "batches.meta").exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "cifar-10-python.tar.gz"
    try:
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(CIFAR10_URL, tmp)
        tmp.rename(archive)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"could not download CIFAR-10 ({e.__class__.__name__}: {e}). Offline, point --data at an existing "
            "cifar-10-batches-py folder or at an image-folder tree (<root>/train/<class>/*.jpg)."
        ) from None
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != CIFAR10_MD5:
        archive.unlink()
        raise DataError(f"downloaded archive has MD5 {md5}, expected {CIFAR10_MD5}; removed it, try again")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return target


# ------------------------------------------------------------------------------------------ image folder
def _list_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not split_dir.is_dir():
        raise DataError(f"missing split folder {split_dir} (expected <root>/<split>/<class>/<image files>)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir}")
    files = []
    for ci, c in enumerate(classes):
        cls_files = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not cls_files:
            raise DataError(f"class folder {split_dir / c} holds no images")
        files += [(p, ci) for p in cls_files]
    return classes, files


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from atop_serve import png
    from atop_serve.errors import CorruptImage

    try:
        with Image.open(path) as im:
            im.load()
            png.check_complete(im, path.read_bytes)  # a cut PNG, which Pillow reads with black rows
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, CorruptImage) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def _load_folder(root: Path, split: str, size: int, use_cache: bool) -> Dataset:
    classes, files = _list_folder(root / split)
    h = hashlib.sha256(f"v1|{root.resolve()}|{split}|{size}".encode())
    for p, c in files:
        try:
            st = p.stat()
        except OSError as e:  # a dangling link, or a file removed since the listing
            raise DataError(f"cannot read image {p}: {e.strerror or e}") from None
        h.update(f"{p.name}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = cache_dir() / f"{split}-{h.hexdigest()[:20]}.npz"
    if use_cache and cache.exists():
        try:
            z = np.load(cache)
            return Dataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes, str(root))
        except Exception:  # noqa: BLE001  (a broken cache is re-read, never trusted)
            cache.unlink(missing_ok=True)
    images = np.stack([_decode(p, size) for p, _ in _progress(files, f"decoding {split}")]).transpose(0, 3, 1, 2)
    labels = np.array([c for _, c in files], dtype=np.int64)
    images = np.ascontiguousarray(images)
    if use_cache:
        # a name of this process's own: torchrun's ranks decode at once, and each renames its file into place
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, images=images, labels=labels)
            tmp.replace(cache)  # atomic: a killed run never leaves a half-written cache
        except OSError as e:  # a full or read-only disk costs the next run a re-decode, never this run's data
            print(f"warning: could not cache decoded {split} images in {cache.parent}: {e}", file=sys.stderr)
        finally:
            with contextlib.suppress(OSError):  # no debris to remove where the cache folder could not be made
                tmp.unlink(missing_ok=True)
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), classes, str(root))


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="img", leave=False, mininterval=1.0)
    except ImportError:  # pragma: no cover
        return items


# ------------------------------------------------------------------------------------------ augmentation
def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Batched random translate (reflect padding, +-pad px) and horizontal flip on (N, C, H, W)."""
    n, _, h, w = images.shape
    if flip:
        do_flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(do_flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1).expand(-1, images.size(1), -1, w + 2 * pad)
        padded = padded.gather(2, rows)
        cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w).expand(-1, images.size(1), h, -1)
        images = padded.gather(3, cols)
    return images
