"""Where Triton can run: the one rule every kernel module (and engine/ops) uses.

- `triton_importable()`: the package is installed (checked once, without importing it).
- `interpreting()`: TRITON_INTERPRET=1, read at call time. Note that Triton reads it when `@triton.jit`
  decorates a function, so it must be set before a kernel module is imported; a later change only affects
  what these functions answer (tests set it to "0" to see the CPU fallbacks).
- `triton_runs_on(t)`: a CUDA tensor (device), or a CPU tensor (device) while interpreting.
- `triton_runs_here()`: on some device of this machine (a GPU, or the interpreter).
Never touches CUDA at import; imports nothing from the engine.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_TRITON: bool | None = None  # a plain global, not functools.cache: torch.compile traces it as a constant


def triton_importable() -> bool:
    """Whether the `triton` package is installed (one spec lookup, no import)."""
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1), read now."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor | torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of t's device: CUDA, or CPU while interpreting."""
    device = t if isinstance(t, torch.device) else t.device
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def triton_runs_here() -> bool:
    """Whether the Triton kernels can run on this machine at all (a CUDA device, or the interpreter)."""
    return triton_importable() and (interpreting() or torch.cuda.is_available())
