"""The attention kernel behind the joint-attention processors, on [B, S, H, D] tensors.

Backends (`model.attention_backend`):
- `auto`: PyTorch SDPA trying its kernels in the order `auto_order` gives for the device: on Hopper (sm 9.x) with
  16-bit inputs cuDNN > flash > efficient > math, since at head dim 64 cuDNN's attention runs 373-395 TFLOP/s
  against FlashAttention-2's 306-318 on an H100 at 1-2k tokens (FA3 paper, DESIGN §3), while SDPA's own order
  puts flash first; on older GPUs flash > efficient > cuDNN > math; on the CPU torch's own order;
- `sdpa`: SDPA with torch's own order (flash > efficient > math on CUDA);
- `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`, `sdpa-math`: that SDPA kernel alone (benchmarks, the GPU probe);
- `flash` (the flash-attn package), `xformers`: when importable and on CUDA.
A backend that cannot run on the inputs falls back to `sdpa` with one log line (never an error). `auto` and the
`sdpa-*` kernels also apply to diffusers' reference processor (`sdpa_context` around its SDPA call).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("engine.backends.sd3.attention")

SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_CHOICES = ("auto", "sdpa", *(f"sdpa-{k}" for k in SDPA_KERNELS))
"""Backends that run through F.scaled_dot_product_attention (the reference processor can use these)."""
ATTENTION_BACKENDS = (*SDPA_CHOICES, "flash", "xformers")
_WARNED: set[str] = set()
# sdpa_kernel(set_priority=...) orders the kernels (torch >= 2.6); without it the list only restricts them
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def warn_once(msg: str) -> None:
    """Log `msg` once per process (the fallbacks of the attention path)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning("flowopd attention: %s", msg)


def auto_order(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype) -> tuple[str, ...] | None:
    """The SDPA kernels `auto` tries, in order, on a device of this type and compute capability for inputs of
    `dtype`; None = torch's own order (the CPU, where SDPA has no cuDNN kernel)."""
    if device_type != "cuda" or capability is None:
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        return ("efficient", "math")  # cuDNN and flash take 16-bit inputs only
    if capability[0] >= 9:
        return ("cudnn", "flash", "efficient", "math")
    return ("flash", "efficient", "cudnn", "math")


def device_of(t: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """(device type, compute capability or None) of a tensor's device: what `auto` decides on."""
    return t.device.type, torch.cuda.get_device_capability(t.device) if t.is_cuda else None


def sdpa_kernels(backend: str, device_type: str, capability: tuple[int, int] | None,
                 dtype: torch.dtype) -> tuple[str, ...] | None:
    """The SDPA kernels `backend` allows on such a device for `dtype` inputs, in priority order; None = torch's."""
    if backend == "auto":
        return auto_order(device_type, capability, dtype)
    if backend.startswith("sdpa-"):
        return (backend.removeprefix("sdpa-"),)
    return None


@contextlib.contextmanager
def sdpa_context(backend: str, q: torch.Tensor) -> Iterator[None]:
    """Restrict (and order) the kernels of every F.scaled_dot_product_attention call inside to `backend`'s."""
    kernels = sdpa_kernels(backend, *device_of(q), q.dtype)
    if kernels is None:
        yield
        return
    chosen = [SDPA_KERNELS[k] for k in kernels]
    with sdpa_kernel(chosen, set_priority=True) if _HAS_PRIORITY else sdpa_kernel(chosen):
        yield


@functools.cache
def _importable(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a wheel built for another torch/CUDA fails in many ways at import
        return False
    return True


def attention_backend_usable(backend: str, q: torch.Tensor) -> bool:
    """Can `backend` run on q ([B, S, H, D])? The SDPA choices always (a kernel SDPA cannot use falls back);
    flash/xformers only if importable and on CUDA."""
    if backend in SDPA_CHOICES:
        return True
    if not q.is_cuda:
        return False
    if backend == "flash":
        return (
            _importable("flash_attn") and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256
        )  # fmt: skip
    if backend == "xformers":
        return _importable("xformers.ops")
    raise ValueError(f"unknown attention backend {backend!r}; valid: {ATTENTION_BACKENDS}")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on [B, S, H, D] tensors, returned as [B, S, H, D] (possibly a strided view).

    A backend that cannot run here falls back to SDPA with one log line (never an error).
    """
    if backend in SDPA_CHOICES:
        try:
            with sdpa_context(backend, q):
                return _sdpa(q, k, v)
        except RuntimeError as exc:  # "No viable backend for scaled_dot_product_attention": the kernel refuses q
            if backend == "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            warn_once(f"attention backend {backend!r} cannot run {q.dtype} {tuple(q.shape)} on {q.device}: using "
                      f"sdpa ({str(exc).splitlines()[0][:120]})")
            return _sdpa(q, k, v)
    if not attention_backend_usable(backend, q):
        warn_once(f"attention backend {backend!r} not usable for {q.dtype} on {q.device}; using sdpa")
        return _sdpa(q, k, v)
    if backend == "flash":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    import xformers.ops

    return xformers.ops.memory_efficient_attention(q, k, v)
