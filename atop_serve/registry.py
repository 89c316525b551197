"""Name -> constructor registries for classifiers and purifiers (timm-style).

    @register_classifier
    def airnet(num_classes=10): ...

    create_classifier("airnet")  # unknown names fail listing the valid ones
"""
from __future__ import annotations

from typing import Callable

from .errors import ModelError

_REGISTRIES: dict[str, dict[str, Callable]] = {"classifier": {}, "purifier": {}}


def _register(kind: str, fn: Callable | None = None, *, name: str | None = None):
    def deco(f: Callable) -> Callable:
        key = name or f.__name__.replace("_", "-")
        if key in _REGISTRIES[kind]:
            raise ValueError(f"{kind} {key!r} registered twice")
        _REGISTRIES[kind][key] = f
        return f

    return deco(fn) if fn is not None else deco


def register_classifier(fn=None, *, name=None):
    return _register("classifier", fn, name=name)


def register_purifier(fn=None, *, name=None):
    return _register("purifier", fn, name=name)


def _ensure_loaded() -> None:
    from . import nets  # noqa: F401  (importing the package registers every architecture)


def list_models(kind: str) -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRIES[kind])


def _create(kind: str, name: str, **kwargs):
    _ensure_loaded()
    try:
        ctor = _REGISTRIES[kind][name]
    except KeyError:
        raise ModelError(f"unknown {kind} architecture {name!r}; valid: {', '.join(list_models(kind))}") from None
    return ctor(**kwargs)


def create_classifier(name: str, **kwargs):
    return _create("classifier", name, **kwargs)


def create_purifier(name: str, **kwargs):
    return _create("purifier", name, **kwargs)
