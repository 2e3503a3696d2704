"""The `triton` and `cuda` backends of the sampling ops, registered with engine.dispatch (kernels/ has the code).

Ops and signatures (the torch backend of each is the reference):
- `sde_step`, `ode_step`, `cfg_combine`: exactly the arguments of `sde_step_ref`, `ode_step_ref`,
  `cfg_combine_ref` in engine/sampling/steps.py, so the dispatch swaps them transparently;
- `sde_step_indexed`, `ode_step_indexed`: the graph-capturable forms (steps.py documents them).
Availability: `cuda` where the native ops of csrc/ are built and a GPU is present; `triton` on a GPU, or in the
CPU interpreter (TRITON_INTERPRET=1) only when triton is requested explicitly (`auto` never picks the
interpreter: it is orders of magnitude slower than PyTorch on CPU). A backend whose kernel cannot take the inputs
(CPU tensors, float64, compute_dtype float64, grads into noise or sigmas, mixed dtypes for cuda) hands them on:
cuda -> triton -> torch, so no input ever fails for want of a kernel. Nothing here imports triton or touches
CUDA at import time; the kernel modules are imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence

import torch

from engine import dispatch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available(op: str) -> Callable[[], bool]:
    def available() -> bool:
        if not _triton_importable():
            return False
        return torch.cuda.is_available() or (_interpreting() and dispatch.requested(op) == "triton")

    return available


def _cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from kernels.native import native_available

    return native_available()


def _tensors_ok(x: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.ndim < 2 or x.numel() == 0:
        return False
    return all(t is None or (t.shape == x.shape and t.device == x.device and t.dtype in _FLOATS) for t in others)


def _triton_takes(x: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    on_device = x.is_cuda or (x.device.type == "cpu" and _interpreting())
    return _triton_importable() and on_device and _tensors_ok(x, others)


def _cuda_takes(x: torch.Tensor, vels: Sequence[torch.Tensor | None], aux: torch.Tensor | None = None) -> bool:
    """The C++ op: CUDA, x and velocities of one dtype, aux in that dtype or float32, B <= 65535 (grid.y)."""
    if not (x.is_cuda and _tensors_ok(x, [*vels, aux]) and x.shape[0] <= 65535 and _cuda_available()):
        return False
    same = all(t is None or t.dtype == x.dtype for t in vels)
    return same and (aux is None or aux.dtype in (x.dtype, torch.float32)) and _triton_importable()  # bwd: Triton


def _pick(backend: str, x: torch.Tensor, vels: Sequence[torch.Tensor | None], aux: torch.Tensor | None) -> str | None:
    if backend == "cuda" and _cuda_takes(x, vels, aux):
        return "cuda"
    return "triton" if _triton_takes(x, [*vels, aux]) else None


def _index_ok(x: torch.Tensor, sigmas: torch.Tensor, step: torch.Tensor) -> bool:
    """The kernels read a float32 table and int steps on x's device (the reference also takes other dtypes)."""
    return (sigmas.dtype == torch.float32 and sigmas.device == x.device and step.device == x.device
            and step.dtype in (torch.int32, torch.int64) and step.numel() in (1, x.shape[0]))


def _no_grad_into(*values: object) -> bool:
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in values)


def _sde_step(backend: str) -> Callable:
    def sde_step(x, v, sigma, sigma_next, sigma_1, noise_level, noise=None, prev_sample=None, generator=None,
                 compute_dtype=torch.float32):
        from engine.sampling.steps import SDEStepOutput, sde_step_ref

        aux = prev_sample if prev_sample is not None else noise
        ok = compute_dtype == torch.float32 and _no_grad_into(noise, sigma, sigma_next, sigma_1)
        ok = ok and (generator is None or generator.device.type in ("cpu", x.device.type))
        kind = _pick(backend, x, [v], aux) if ok else None
        if kind is None:
            return sde_step_ref(x, v, sigma, sigma_next, sigma_1, noise_level, noise, prev_sample, generator,
                                compute_dtype)
        from kernels.sde_step import sde_step as fused

        r = fused(x, v, sigma, sigma_next, sigma_1, noise_level, noise, prev_sample, generator, backend=kind)
        return SDEStepOutput(sample=r.sample, mean=r.mean, log_prob=r.log_prob, std=r.std)

    return sde_step


def _ode_step(backend: str) -> Callable:
    def ode_step(x, v, sigma, sigma_next):
        from engine.sampling.steps import ode_step_ref

        kind = _pick(backend, x, [v], None) if _no_grad_into(sigma, sigma_next) else None
        if kind is None:
            return ode_step_ref(x, v, sigma, sigma_next)
        from kernels.ode_step import ode_step as fused

        return fused(x, v, sigma, sigma_next, backend=kind)

    return ode_step


def _cfg_combine(v_uncond, v_cond, scale):
    from engine.sampling.steps import cfg_combine_ref

    if not (isinstance(v_uncond, torch.Tensor) and isinstance(v_cond, torch.Tensor)):
        return cfg_combine_ref(v_uncond, v_cond, scale)
    # any rank: the kernel is flat; view as [1, M] for the checks
    ok = v_uncond.shape == v_cond.shape and v_uncond.numel() > 0
    ok = ok and _triton_takes(v_uncond.reshape(1, -1), [v_cond.reshape(1, -1)])
    if not ok or isinstance(scale, torch.Tensor):
        return cfg_combine_ref(v_uncond, v_cond, scale)
    from kernels.ode_step import cfg_combine

    return cfg_combine(v_uncond, v_cond, scale)


def sde_step_indexed_torch(x, v, sigmas, step, noise_level, *, v_uncond=None, v_cond=None, guidance=1.0, noise=None,
                           prev_sample=None, seed=0, offset=0, return_mean=True, out=None):
    """The reference of the indexed step (same noise stream as the kernels); `out` receives x' by a copy."""
    from kernels.sde_step import sde_step_indexed_ref

    r = sde_step_indexed_ref(x, v, sigmas, step, noise_level, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance,
                             noise=noise, prev_sample=prev_sample, seed=seed, offset=offset, return_mean=return_mean)
    if out is not None:
        r = r._replace(sample=out.copy_(r.sample))
    return r


def _sde_step_indexed(backend: str) -> Callable:
    def sde_step_indexed(x, v, sigmas, step, noise_level, *, v_uncond=None, v_cond=None, guidance=1.0, noise=None,
                         prev_sample=None, seed=0, offset=0, return_mean=True, out=None):
        kw = dict(v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, noise=noise, prev_sample=prev_sample,
                  seed=seed, offset=offset, return_mean=return_mean, out=out)
        aux = prev_sample if prev_sample is not None else noise
        ok = _no_grad_into(noise, sigmas) and _index_ok(x, sigmas, step)
        kind = _pick(backend, x, [v, v_uncond, v_cond], aux) if ok else None
        if kind is None:
            return sde_step_indexed_torch(x, v, sigmas, step, noise_level, **kw)
        from kernels.sde_step import sde_step_indexed as fused

        return fused(x, v, sigmas, step, noise_level, backend=kind, **kw)

    return sde_step_indexed


def ode_step_indexed_torch(x, v, sigmas, step, *, v_uncond=None, v_cond=None, guidance=1.0, out=None):
    from kernels.ode_step import ode_step_indexed_ref

    r = ode_step_indexed_ref(x, v, sigmas, step, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance)
    return r if out is None else out.copy_(r)


def _ode_step_indexed(backend: str) -> Callable:
    def ode_step_indexed(x, v, sigmas, step, *, v_uncond=None, v_cond=None, guidance=1.0, out=None):
        kw = dict(v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, out=out)
        ok = _no_grad_into(sigmas) and _index_ok(x, sigmas, step)
        kind = _pick(backend, x, [v, v_uncond, v_cond], None) if ok else None
        if kind is None:
            return ode_step_indexed_torch(x, v, sigmas, step, **kw)
        from kernels.ode_step import ode_step_indexed as fused

        return fused(x, v, sigmas, step, backend=kind, **kw)

    return ode_step_indexed


def register_all() -> None:
    """Register every backend above (idempotent: re-registering replaces)."""
    dispatch.register("sde_step_indexed", "torch", sde_step_indexed_torch)
    dispatch.register("ode_step_indexed", "torch", ode_step_indexed_torch)
    for backend, avail in (("cuda", lambda op: _cuda_available), ("triton", _triton_available)):
        dispatch.register("sde_step", backend, _sde_step(backend), avail("sde_step"))
        dispatch.register("ode_step", backend, _ode_step(backend), avail("ode_step"))
        dispatch.register("sde_step_indexed", backend, _sde_step_indexed(backend), avail("sde_step_indexed"))
        dispatch.register("ode_step_indexed", backend, _ode_step_indexed(backend), avail("ode_step_indexed"))
    dispatch.register("cfg_combine", "triton", _cfg_combine, _triton_available("cfg_combine"))
