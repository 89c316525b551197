"""atop-serve: adversarially robust image classification by Adversarial Training on Purification (AToP).

The torch-based API (``load_pipeline``, ``load_classifier``, ``PurifiedClassifier``) is imported lazily, so a
serving-only install (ONNX Runtime, no torch) can import this package.
"""
from .config import RTConfig
from .errors import AtopError, DataError, ExportError, ModelError

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "modelio", "load_classifier": "modelio", "load_purifier": "modelio",
    "read_card": "modelio", "DEFAULT_MODEL_DIR": "modelio",
    "PurifiedClassifier": "pipeline", "TTAClassifier": "pipeline",
    "random_transform": "transforms", "draw_rt_inputs": "transforms", "RTInputs": "transforms",
    "create_classifier": "registry", "create_purifier": "registry", "list_models": "registry",
}

__all__ = ["RTConfig", "AtopError", "DataError", "ExportError", "ModelError", *list(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
