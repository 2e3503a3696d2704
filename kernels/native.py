"""Loading the CUDA C++ ops of csrc/ (torch.ops.flowopd.*), once, with one log line when they are unavailable.

Where they come from, first found wins: the `flowopd_native` extension module that `pip install` builds
(setup.py), or a shared library from the CMake build: $FLOWOPD_NATIVE_LIB, else build/libflowopd_native.so at the
repository root. FLOWOPD_NATIVE=0 disables them at run time too. Never touches CUDA at import.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_OPS = ("sde_step_fwd", "ode_step_fwd")


def _registered() -> bool:
    ns = torch.ops.flowopd
    try:
        return all(hasattr(ns, op) for op in _OPS)
    except RuntimeError:  # pragma: no cover - older torch raises instead of returning False
        return False


def _load() -> str | None:
    """None when loaded, else the reason."""
    if os.environ.get("FLOWOPD_NATIVE", "auto").lower() in ("0", "off", "false"):
        return "disabled by FLOWOPD_NATIVE=0"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA device / CPU torch"
    try:
        importlib.import_module("flowopd_native")
    except ImportError:
        lib = os.environ.get("FLOWOPD_NATIVE_LIB") or str(
            Path(__file__).resolve().parent.parent / "build" / "libflowopd_native.so")
        if not Path(lib).is_file():
            return "not built (pip install with a CUDA toolchain, or the CMake build)"
        try:
            torch.ops.load_library(lib)
        except OSError as e:
            return f"{lib} failed to load: {e}"
    return None if _registered() else "library loaded but torch.ops.flowopd ops are missing"


@functools.cache
def native_available() -> bool:
    """Whether torch.ops.flowopd.{sde_step_fwd, ode_step_fwd} can run here (logs the reason once if not)."""
    reason = _load()
    if reason is not None:
        log.info("flowopd: native CUDA ops unavailable (%s); using Triton or the PyTorch reference", reason)
    return reason is None
