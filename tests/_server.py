"""Helpers for the tests that run the real service: serving folders with random weights, and a ``bentoml serve``
subprocess on a free local port (tests/test_service.py, tests/test_web.py)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atop_serve import modelio
from atop_serve.errors import AtopError
from training import loadgen
from training.loadgen import REPO, Server, free_port  # noqa: F401  (re-exported for the service tests)

READY_TIMEOUT_S = 60


def export_folder(folder: Path) -> Path:
    """Add the graphs a serving folder holds: pipeline.onnx and the bare classifier's classifier.onnx (whose
    external-data record goes into the card, as `atop export` writes it)."""
    import torch

    from export.onnx_export import export_classifier, export_onnx

    torch.set_num_threads(1)
    pipeline = modelio.load_pipeline(folder)
    export_onnx(pipeline, folder / modelio.ONNX_FILE)
    _, shared = export_classifier(pipeline.classifier, folder / modelio.CLASSIFIER_ONNX_FILE,
                                  folder / modelio.CLASSIFIER_FILE)
    card = modelio.read_card(folder)
    card["export"] = {"files": {modelio.CLASSIFIER_ONNX_FILE: {"external_data": shared}}}
    modelio.write_card(folder, card)
    return folder


def deterministic_folder(path: Path) -> Path:
    """A serving folder (random weights + graphs) whose RT does nothing (rt1 with rate 0): the service's answers
    can be compared exactly with the offline graph's. Its card recommends K = 2 purification samples (the
    service's default K; with RT off every sample is the same)."""
    from tests.conftest import make_model_folder

    folder = make_model_folder(path, rt_kind="rt1")
    card = modelio.read_card(folder)
    card["purifier"]["rt"]["rate"] = 0.0
    card["pipeline"] = {"samples": 2}
    modelio.write_card(folder, card)
    return export_folder(folder)


@contextlib.contextmanager
def serve(folder: Path, env: dict[str, str], tmp: Path):
    """``bentoml serve`` of ``folder`` on 127.0.0.1 with the ``ATOP_*`` settings ``env`` (others cleared) and a private
    BentoML home under ``tmp``; yields a Server (url, log, startup_s, post, get) once /readyz answers, stops the whole
    process group after. The same helper `atop bench` uses (training.loadgen.serve); a server that does not come up
    fails the test with the end of its log."""
    started = False
    try:
        with loadgen.serve(folder, {**env, "BENTOML_HOME": str(tmp / "home")}, log=tmp / "serve.log",
                           ready_timeout_s=READY_TIMEOUT_S) as server:
            started = True
            yield server
    except AtopError as e:
        if started:
            raise
        pytest.fail(str(e))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
