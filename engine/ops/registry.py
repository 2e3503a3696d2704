"""The op table: one `Op` per kernel op, its PyTorch reference, its kernel backends, and the one availability rule.

Backends: `torch` (the op's reference, always there), `triton`, `cuda`. Which one runs for a call:
1. the request: env `FLOWOPD_BACKEND_<OP>` > env `FLOWOPD_BACKEND` > `configure(backends={op: ...})` >
   `configure(default=...)` > `auto`;
2. availability (`available`): `cuda` = a CUDA device + the native ops of csrc/ built + triton importable (the
   cuda backend shares the Triton backwards); `triton` = triton importable and a CUDA device, or the CPU
   interpreter (TRITON_INTERPRET=1) only when `triton` was requested for that op by name: `auto` never picks
   the interpreter, which is orders of magnitude slower than PyTorch on CPU. A requested backend that is
   unavailable here (or that the op has no kernel for) logs one warning per (op, backend) and runs the reference;
3. inputs (`Impl.accepts`): a kernel that cannot take these inputs hands them on, cuda -> triton -> torch,
   silently, so no input fails for want of a kernel. `auto` starts the chain at the fastest available backend.
A misspelt environment value is an error naming the variable (it would otherwise read as "unavailable" and
silently run the reference). Nothing here imports a kernel module or queries CUDA at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.runtime import interpreting, triton_importable

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("cuda", "triton")  # fastest first: the order of `auto` and of the fall-through


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


@dataclass(frozen=True)
class Impl:
    """One kernel backend of an op."""

    fn: Callable[..., Any]
    """Called with the arguments of the op's typed wrapper (the reference's signature)."""
    accepts: Callable[..., bool] = _always
    """Same arguments as `fn`: whether this kernel can take these inputs (else the next backend gets them)."""


@dataclass
class Op:
    """An op of the table: `ref` always runs; `impls` maps "triton" / "cuda" to kernels."""

    name: str
    ref: Callable[..., Any]
    """The PyTorch reference: the `torch` backend and the target of every fall-through."""
    impls: dict[str, Impl] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for backend in self.impls:
            if backend not in KERNEL_BACKENDS:
                raise ValueError(f"unknown backend {backend!r} for {self.name}; kernels are {KERNEL_BACKENDS} "
                                 "(the reference is the torch backend)")


_OPS: dict[str, Op] = {}
_DEFAULT = "auto"
_CHOICE: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()


def register(op: Op) -> Op:
    """Add `op` to the table (replacing an op of the same name); returns it."""
    _OPS[op.name] = op
    return op


def ops() -> list[str]:
    """The names of the registered ops, sorted."""
    return sorted(_OPS)


def _get(name: str) -> Op:
    op = _OPS.get(name)
    if op is None:
        raise KeyError(f"no op {name!r} in the table; registered: {', '.join(ops()) or 'none'}")
    return op


def problems(default: str, backends: Mapping[str, str] | None = None) -> list[str]:
    """Every unknown backend or op name of a `[kernels]` config, one message each (empty when valid)."""
    out = []
    if default not in BACKENDS:
        out.append(f"kernels.default = {default!r}; valid: {', '.join(BACKENDS)}")
    for name, backend in (backends or {}).items():
        if name not in _OPS:
            out.append(f"kernels.backends: unknown op {name!r}; valid: {', '.join(ops())}")
        if backend not in BACKENDS:
            out.append(f"kernels.backends.{name} = {backend!r}; valid: {', '.join(BACKENDS)}")
    return out


def configure(default: str = "auto", backends: Mapping[str, str] | None = None) -> None:
    """Set the config's choice: `default` for every op, `backends` per op (the environment still overrides).

    Replaces any earlier configuration; raises ValueError listing every unknown op or backend.
    """
    found = problems(default, backends)
    if found:
        raise ValueError("; ".join(found))
    global _DEFAULT
    _DEFAULT = default
    _CHOICE.clear()
    _CHOICE.update(backends or {})


def env_request(name: str) -> str | None:
    """The backend the environment asks for `name` (FLOWOPD_BACKEND_<NAME>, else FLOWOPD_BACKEND), or None; a
    misspelt value raises ValueError naming the variable. Also read by switches outside the table (the SD3
    family's `joint_attention` processor choice)."""
    for var in (f"FLOWOPD_BACKEND_{name.upper()}", "FLOWOPD_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            if value.lower() not in BACKENDS:
                raise ValueError(f"{var}={value!r} is not a backend; valid: {', '.join(BACKENDS)}")
            return value.lower()
    return None


def requested(name: str) -> str:
    """The backend asked for op `name`: FLOWOPD_BACKEND_<OP>, else FLOWOPD_BACKEND, else the config, else auto."""
    return env_request(name) or _CHOICE.get(name, _DEFAULT)


def available(backend: str, *, explicit: bool = False) -> bool:
    """Whether `backend` can run on this machine; `explicit`: it was requested by name (lets triton interpret)."""
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_importable() and (torch.cuda.is_available() or (explicit and interpreting()))
    if backend == "cuda":
        if not (torch.cuda.is_available() and triton_importable()):
            return False
        from kernels.native import native_available

        return native_available()
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS[1:])}")


def _chain(op: Op) -> list[tuple[str, Impl]]:
    """The kernels to try in order for op's request (empty: the reference); warns once if the request fails."""
    want = requested(op.name)
    if want == "torch":
        return []
    if want == "auto":
        start = 0
    elif want in op.impls and available(want, explicit=True):
        start = KERNEL_BACKENDS.index(want)
    else:
        if (op.name, want) not in _WARNED:
            _WARNED.add((op.name, want))
            log.warning("flowopd: backend %r for %s is not available here, using the torch reference", want, op.name)
        return []
    chain = [(b, op.impls[b]) for b in KERNEL_BACKENDS[start:] if b in op.impls and (b == want or available(b))]
    return chain


def _pick(chain: list[tuple[str, Impl]], args: tuple, kwargs: dict) -> tuple[str, Impl | None]:
    for backend, impl in chain:
        if impl.accepts(*args, **kwargs):
            return backend, impl
    return "torch", None


def resolve(name: str) -> Callable[..., Any]:
    """The function to call op `name` through now: the request and availability are settled here (errors and the
    fallback warning included), the inputs pick among the remaining kernels when it is called."""
    op = _get(name)
    chain = _chain(op)
    if not chain:
        return op.ref

    def call(*args: Any, **kwargs: Any) -> Any:
        _, impl = _pick(chain, args, kwargs)
        return (op.ref if impl is None else impl.fn)(*args, **kwargs)

    return call


def chosen(name: str, *args: Any, **kwargs: Any) -> str:
    """The backend ("torch", "triton", "cuda") that a call of op `name` with these arguments runs now."""
    return _pick(_chain(_get(name)), args, kwargs)[0]


def available_backends(name: str) -> list[str]:
    """The backends of op `name` that can run here now (the interpreter counts where triton is requested)."""
    op = _get(name)
    want = requested(name)
    kernels = [b for b in KERNEL_BACKENDS if b in op.impls and available(b, explicit=b == want)]
    return [*kernels, "torch"]
