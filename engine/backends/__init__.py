"""Model-family backends behind one protocol (engine/backends/base.py), selected by `model.family`.

Built-in families are imported on first use (so validating a config does not import diffusers); a plug-in
family, e.g. a test-only one, registers itself with `register_backend(MyBackend())` before the config is loaded.
Adding a family = one folder here + one line in `_BUILTIN`.
"""

from __future__ import annotations

import importlib

from engine.backends.base import ModelBackend, ModelSpec, TensorCond, TextEncoder

__all__ = ["ModelBackend", "ModelSpec", "TensorCond", "TextEncoder", "families", "get_backend", "register_backend"]

_BUILTIN: dict[str, str] = {
    "sd3": "engine.backends.sd3",
    "zimage": "engine.backends.zimage",
}
_REGISTRY: dict[str, ModelBackend] = {}


def register_backend(backend: ModelBackend) -> None:
    """Make `backend` selectable as `model.family = backend.family` (re-registering replaces)."""
    _REGISTRY[backend.family] = backend


def families() -> list[str]:
    """Every selectable family name (built-in and registered)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_backend(family: str) -> ModelBackend:
    """The backend of `family`; KeyError listing the valid names."""
    if family not in _REGISTRY and family in _BUILTIN:
        importlib.import_module(_BUILTIN[family])  # its __init__ calls register_backend
    if family not in _REGISTRY:
        raise KeyError(f"unknown model family {family!r}; valid: {', '.join(families())}")
    return _REGISTRY[family]
