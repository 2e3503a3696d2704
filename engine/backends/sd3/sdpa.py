"""The attention kernel behind the fused joint-attention processor: SDPA (default), flash-attn or xformers when
importable, on [B, S, H, D] tensors; a backend that cannot run here falls back to SDPA with one log line."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("engine.backends.sd3.attention")

ATTENTION_BACKENDS = ("sdpa", "flash", "xformers")
_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Log `msg` once per process (the fallbacks of the attention path)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning("flowopd attention: %s", msg)



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
    """Can `backend` run on q ([B, S, H, D])? sdpa always; flash/xformers only if importable and on CUDA."""
    if backend == "sdpa":
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


def attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on [B, S, H, D] tensors, returned as [B, S, H, D] (possibly a strided view).

    A backend that cannot run here falls back to SDPA with one log line (never an error).
    """
    if backend != "sdpa" and not attention_backend_usable(backend, q):
        warn_once(f"attention backend {backend!r} not usable for {q.dtype} on {q.device}; using sdpa")
        backend = "sdpa"
    if backend == "flash":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    if backend == "xformers":
        import xformers.ops

        return xformers.ops.memory_efficient_attention(q, k, v)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
