"""One dispatch point per op: `torch` (the reference, always present), `triton`, `cuda`.

Backends register themselves; the engine asks `resolve(op)` for the callable. The choice comes from the
config (`set_backend`) and can be overridden per op by the environment, e.g. `FLOWOPD_BACKEND_SDE_STEP=torch`
or for every op `FLOWOPD_BACKEND=torch`. `auto` picks the fastest available backend for the device. An
unavailable backend falls back to the reference with a single log line per (op, backend), never a crash.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")
_PREFERENCE = ("cuda", "triton", "torch")  # fastest first, for `auto`


@dataclass
class _Impl:
    fn: Callable
    available: Callable[[], bool]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_CHOICE: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()


def register(op: str, backend: str, fn: Callable, available: Callable[[], bool] = lambda: True) -> None:
    """Register `fn` as the `backend` implementation of `op`; `available()` is checked at resolve time."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r} for {op}; valid: {BACKENDS[1:]}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, available)


def set_backend(op: str, backend: str) -> None:
    """Choose the backend of `op` (or of every op with op='*')."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
    _CHOICE[op] = backend


def requested(op: str) -> str:
    """The backend asked for `op`: env FLOWOPD_BACKEND_<OP>, else env FLOWOPD_BACKEND, else the config, else auto.

    A misspelt environment value is an error naming the variable (it would otherwise read as "unavailable" and
    silently run the reference).
    """
    for var in (f"FLOWOPD_BACKEND_{op.upper()}", "FLOWOPD_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            if value.lower() not in BACKENDS:
                raise ValueError(f"{var}={value!r} is not a backend; valid: {', '.join(BACKENDS)}")
            return value.lower()
    return (_CHOICE.get(op) or _CHOICE.get("*") or "auto").lower()


def resolve(op: str) -> Callable:
    """The implementation of `op` to call now."""
    impls = _REGISTRY.get(op)
    if not impls or "torch" not in impls:
        raise KeyError(f"op {op!r} has no reference implementation registered")
    want = requested(op)
    if want == "auto":
        for name in _PREFERENCE:
            if name in impls and impls[name].available():
                return impls[name].fn
        return impls["torch"].fn
    impl = impls.get(want)
    if impl is not None and impl.available():
        return impl.fn
    if (op, want) not in _WARNED:
        _WARNED.add((op, want))
        log.warning("flowopd: backend %r for %s is not available here, using the torch reference", want, op)
    return impls["torch"].fn


def available_backends(op: str) -> list[str]:
    return [name for name, impl in _REGISTRY.get(op, {}).items() if impl.available()]
