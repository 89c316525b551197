"""Classify image files on disk without a server (and without torch): what ``atop classify`` runs.

The same steps as a ``/classify`` request: each file is decoded as the service decodes an upload
(atop_serve/imageio.py), and classified by the engine the service would load for the model folder
(atop_serve/engine.py: the exported graph, the faster CPU variant where the card ships one), with K purifications
and their own random draws per image: fresh ones, or with a seed the draws the service uses for that seed, so a
file and a seed give the service's answer. Files go through in batches, so a folder of any size streams in bounded
memory. A file that cannot be read yields a result with its error, and the others are still classified.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from .engine import Engine
from .errors import DataError, ImageError
from .imageio import DEFAULT_MAX_PIXELS, decode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BYTES_PER_PIXEL = 8  # a file may be this many bytes per allowed pixel (16-bit RGBA, uncompressed) before it is skipped
FORMATS = ("table", "csv", "jsonl")


@dataclass
class Result:
    """One file's answer: class probabilities averaged over the samples, or why it could not be classified."""

    file: str
    probs: np.ndarray | None = None
    error: str = ""


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, plus every file with an image suffix (``IMAGE_SUFFIXES``) under each folder, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"{p} is neither a file nor a folder")
        else:
            raise DataError(f"{p} does not exist")
    if not files:
        raise DataError("no files to classify: name image files or folders")
    return files


def read_pixels(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file -> uint8 RGB (size, size, 3), as the service decodes an upload; ImageError or OSError otherwise."""
    n = path.stat().st_size
    if n == 0:
        raise ImageError("the file is empty")
    if n > BYTES_PER_PIXEL * max_pixels:
        raise ImageError(f"the file is {n / 1e6:.0f} MB, more than an image of at most {max_pixels / 1e6:g} MP needs")
    return decode(path.read_bytes(), size, max_pixels)


def classify_files(engine: Engine, files: Sequence[Path], samples: int, seed: int | None = None,
                   batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Result]:
    """One ``Result`` per file, in order, ``batch_size`` files per engine call (each file: ``samples`` rows)."""
    size = engine.rt.image_size
    for start in range(0, len(files), batch_size):
        results, pixels = [], []
        for f in files[start:start + batch_size]:
            try:
                pixels.append(read_pixels(f, size, max_pixels))
                results.append(Result(str(f)))
            except ImageError as e:
                results.append(Result(str(f), error=str(e)))
            except OSError as e:
                results.append(Result(str(f), error=f"cannot read the file: {e.strerror or e}"))
        good = [r for r in results if not r.error]
        if good:
            probs = engine.classify(np.stack(pixels), samples, [seed] * len(good))
            for r, p in zip(good, probs):
                r.probs = p
        yield from results


class FolderScore:
    """Top-1 accuracy against class folders: a file in a folder named after a class (``test/cat/1.png``) is
    labelled with that class; files elsewhere, and files that could not be read, are counted apart."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.correct = self.labelled = self.unlabelled = self.unreadable = 0

    def add(self, r: Result) -> None:
        label = Path(r.file).parent.name
        if r.probs is None:
            self.unreadable += 1
        elif label not in self.classes:
            self.unlabelled += 1
        else:
            self.labelled += 1
            self.correct += self.classes[int(np.argmax(r.probs))] == label

    def summary(self) -> str:
        if not self.labelled:
            return (f"no classified file sits in a folder named after a class ({', '.join(self.classes)}): "
                    "nothing to score")
        others = [f"{n} {what}" for n, what in ((self.unlabelled, "outside a class folder"),
                                                (self.unreadable, "unreadable")) if n]
        return (f"accuracy against the class folders: {100 * self.correct / self.labelled:.2f} % "
                f"({self.correct} of {self.labelled})" + (f"; not scored: {', '.join(others)}" if others else ""))


class Writer:
    """Results -> a stream as an aligned table (for people), CSV or JSON lines (for programs)."""

    def __init__(self, stream: IO[str], fmt: str, classes: Sequence[str], samples: int):
        if fmt not in FORMATS:
            raise DataError(f"unknown output format {fmt!r}; valid: {', '.join(FORMATS)}")
        self.stream, self.fmt, self.classes, self.samples = stream, fmt, list(classes), samples
        self.csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["file", "label", "class_id", "probability", *self.classes, "error"])
        self.width = max(map(len, self.classes))

    def write(self, r: Result) -> None:
        best = None if r.probs is None else int(np.argmax(r.probs))
        if self.csv is not None:
            if best is None:
                self.csv.writerow([r.file, "", "", "", *[""] * len(self.classes), r.error])
            else:
                self.csv.writerow([r.file, self.classes[best], best, f"{r.probs[best]:.6f}",
                                   *(f"{p:.6f}" for p in r.probs), ""])
        elif self.fmt == "jsonl":
            row: dict = {"file": r.file}
            if best is None:
                row["error"] = r.error
            else:
                row.update(label=self.classes[best], class_id=best, samples=self.samples,
                           probabilities={c: round(float(p), 6) for c, p in zip(self.classes, r.probs)})
            self.stream.write(json.dumps(row) + "\n")
        elif best is None:
            self.stream.write(f"{'error':<{self.width}}  {'':>6}  {r.file}: {r.error}\n")
        else:
            self.stream.write(f"{self.classes[best]:<{self.width}}  {r.probs[best]:6.1%}  {r.file}\n")


class AtomicFile:
    """A text file written in full or not at all: to a temporary sibling, renamed over ``path`` on success, so an
    existing file is never left half-written and a failed run leaves it as it was."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"--out {self.path} is a folder; name a file")
        if not self.path.parent.is_dir():
            raise DataError(f"--out {self.path}: folder {self.path.parent} does not exist")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:  # a folder this process cannot write to fails now, not after the work
            open(self.tmp, "w").close()
            self.tmp.unlink()
        except OSError as e:
            raise DataError(f"--out {self.path}: cannot write in {self.path.parent} ({e.strerror or e})") from None

    def __enter__(self) -> io.TextIOWrapper:
        self.stream = open(self.tmp, "w", encoding="utf-8", newline="")
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stream.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
