"""Shared fixtures: the real dataset where present, and tiny random-weight model folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ROOT = Path(os.environ.get("ATOP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"))


def needs_data():
    return pytest.mark.skipif(not (DATA_ROOT / "test").is_dir(),
                              reason=f"CIFAR-10 JPEG copy not found at {DATA_ROOT} (set ATOP_DATA)")


def make_model_folder(path: Path, seed: int = 0, rt_kind: str = "rt2", sigma: float = 0.1, tta: str = "flip") -> Path:
    """A complete model folder with random weights (airnet + gated-unet): for tests that need the format,
    not the accuracy."""
    import torch

    from atop_serve import modelio
    from atop_serve.config import RTConfig
    from atop_serve.registry import create_classifier, create_purifier

    torch.manual_seed(seed)
    clf, pur = create_classifier("airnet"), create_purifier("gated-unet")
    path.mkdir(parents=True, exist_ok=True)
    card = {
        "format": "atop-serve/1",
        "name": f"random-{seed}",
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "input": {"size": 32, "range": "RGB float in [0, 1], NCHW"},
        "classifier": {"arch": "airnet", "file": modelio.CLASSIFIER_FILE, "tta": tta,
                       "sha256": modelio.save_weights(clf, path / modelio.CLASSIFIER_FILE)},
        "purifier": {"arch": "gated-unet", "file": modelio.PURIFIER_FILE,
                     "rt": RTConfig.named(rt_kind, sigma=sigma).to_dict(),
                     "sha256": modelio.save_weights(pur, path / modelio.PURIFIER_FILE)},
    }
    modelio.write_card(path, card)
    return path


@pytest.fixture(scope="session", autouse=True)
def _torch_threads_baseline() -> int:
    """torch's thread count when the session starts (set up before any other fixture: autouse, session scope)."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads(_torch_threads_baseline):
    """torch.set_num_threads is process-wide: tests and fixtures that pin one thread (export, the eager engine, the
    eval tests) would otherwise slow every later test; the training tests ran at half speed behind such a pin."""
    yield
    import torch

    if torch.get_num_threads() != _torch_threads_baseline:
        torch.set_num_threads(_torch_threads_baseline)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model") / "random")


@pytest.fixture(scope="session")
def det_folder(tmp_path_factory) -> Path:
    """A serving folder (random weights + graphs) whose RT does nothing: rt1 with rate 0 (tests/_server.py)."""
    from tests._server import deterministic_folder

    return deterministic_folder(tmp_path_factory.mktemp("serve") / "det")
