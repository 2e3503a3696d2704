"""Euler ODE step (DanceOPD rollouts) and the CFG / field-target combination, as fused elementwise kernels.

    ode:  x' = x + (sigma_next - sigma) v,      v = v_u + g (v_c - v_u) when CFG is fused
    cfg:  v  = v_u + g (v_c - v_u)              (CFG rollouts, and DanceOPD's operator-defined field target
                                                 v_F = v_0 + alpha (v_c - v_0) without a [B, ...] temporary)
Sigmas come from a device table indexed by a device step tensor as in kernels/sde_step.py (graph-capturable).
Math is float32; the step returns x's dtype, the combination the promoted dtype of its inputs. Both maps are
linear, so their backward is two scaled copies in PyTorch (memory-bound like the forward, no kernel needed).
The `cuda` backend runs the ODE step from csrc/ (torch.ops.flowopd.ode_step_fwd).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.runtime import triton_importable
from kernels.sde_step import _check_out, _empty, _nd, _per_row, sigma_terms_ref

if triton_importable():
    import triton
    import triton.language as tl

_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, 2 x 16 B for bf16


# --------------------------------------------------------------------------------------------- reference


def ode_step_indexed_ref(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    next_off: int = 1,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x + (sigmas[step + 1] - sigmas[step]) v as an unfused chain (x's dtype out)."""
    b = x.shape[0]
    _, dt, _ = sigma_terms_ref(sigmas, step, b, 0.0, next_off, 0, compute_dtype)
    vf = v.to(compute_dtype) if v is not None else cfg_combine_ref(v_uncond.to(compute_dtype),
                                                                   v_cond.to(compute_dtype), guidance)
    return (x.to(compute_dtype) + dt.reshape((b,) + (1,) * (x.ndim - 1)) * vf).to(x.dtype)


def cfg_combine_ref(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + g (v_c - v_u) in PyTorch."""
    return v_uncond + scale * (v_cond - v_uncond)


# --------------------------------------------------------------------------------------------- Triton kernels

if triton_importable():

    @triton.jit
    def _ode_step_kernel(
        x_ptr,  # [B, N] state, any float dtype
        v_ptr,  # [B, N] velocity, or v_u with CFG
        vc_ptr,  # [B, N] v_c with CFG (else an unused alias of v_ptr)
        out_ptr,  # [B, N] out x' in x's dtype (may alias x_ptr: every element is read before it is written)
        sig_ptr,  # float32 sigma table
        step_ptr,  # int step index per row (stride step_stride: 0 = shared)
        N, step_stride, next_off, guidance,
        BLOCK: tl.constexpr, CFG: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.program_id(1)
        k = tl.load(step_ptr + row * step_stride).to(tl.int64)
        dt = tl.load(sig_ptr + k + next_off) - tl.load(sig_ptr + k)
        n = pid * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        offs = row.to(tl.int64) * N + n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            v = v + guidance * (tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32) - v)
        tl.store(out_ptr + offs, (x + dt * v).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cfg_combine_kernel(
        vu_ptr,  # [M] unconditional velocity
        vc_ptr,  # [M] conditional velocity
        out_ptr,  # [M] out v_u + g (v_c - v_u)
        M, guidance,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (vu + guidance * (vc - vu)).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


# Custom ops, as in kernels/sde_step.py (not `flowopd::ode_step_fwd`: the C++ op the `cuda` backend calls inside).
# With `out` given the result is written there and a 0-element tensor comes back (no alias of an input). Eager
# calls run the functions directly (the op layer's dispatch costs ~94 us per call, see kernels/sde_step.py).


def _ode_step_fwd(
    backend: str,
    x: torch.Tensor,
    v: torch.Tensor,
    vc: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    next_off: int,
    guidance: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    b = x.shape[0]
    n = x.numel() // b
    x2, v2 = x.reshape(b, n).contiguous(), v.reshape(b, n).contiguous()
    vc2 = vc.reshape(b, n).contiguous() if vc is not None else None
    res = out.reshape(b, n) if out is not None else _empty((b, n), x.dtype, x.device)
    if backend == "cuda":
        torch.ops.flowopd.ode_step_fwd(x2, v2, vc2, table, step.to(torch.int64), next_off, float(guidance), res)
    else:
        _ode_step_kernel[(triton.cdiv(n, _BLOCK), b)](
            x2, v2, vc2 if vc2 is not None else v2, res, table, step, n, int(step.numel() != 1), next_off,
            float(guidance), BLOCK=_BLOCK, CFG=vc is not None, num_warps=8)
    return x.new_empty(0) if out is not None else res.view(x.shape)


_ode_step_fwd_op = torch.library.custom_op("flowopd::ode_step_kernel_fwd", _ode_step_fwd, mutates_args=("out",))


@_ode_step_fwd_op.register_fake
def _(backend, x, v, vc, table, step, next_off, guidance, out):
    return x.new_empty(0) if out is not None else x.new_empty(x.shape)


def _cfg_combine_fwd(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    vu, vc = v_uncond.contiguous(), v_cond.contiguous()
    out = _empty(vu.shape, torch.promote_types(vu.dtype, vc.dtype), vu.device)
    m = vu.numel()
    _cfg_combine_kernel[(triton.cdiv(m, _BLOCK),)](vu, vc, out, m, float(scale), BLOCK=_BLOCK, num_warps=8)
    return out


_cfg_combine_fwd_op = torch.library.custom_op("flowopd::cfg_combine_kernel_fwd", _cfg_combine_fwd, mutates_args=())


@_cfg_combine_fwd_op.register_fake
def _(v_uncond, v_cond, scale):
    return v_uncond.new_empty(v_uncond.shape, dtype=torch.promote_types(v_uncond.dtype, v_cond.dtype))


def _launch_ode(backend: str, x, v, vc, table, step, next_off: int, guidance: float, out):
    fwd = _ode_step_fwd_op if torch.compiler.is_compiling() else _ode_step_fwd
    res = fwd(backend, _nd(x), _nd(v), _nd(vc), _nd(table), step, next_off, float(guidance), out)
    return out.view(x.shape) if out is not None else res


class ODEStepFunction(torch.autograd.Function):
    """x' = x + dt v with v = v_u + g (v_c - v_u):  gx = gout,  gv = dt gout,  gv_u = (1 - g) gv,  gv_c = g gv."""

    @staticmethod
    def forward(ctx: Any, backend: str, table: torch.Tensor, step: torch.Tensor, next_off: int, guidance: float,
                x: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None) -> torch.Tensor:
        """x' = x + dt v (v = v_u + g (v_c - v_u) when vc is given), one launch."""
        ctx.table, ctx.step, ctx.next_off, ctx.guidance, ctx.cfg = table, step, next_off, guidance, vc is not None
        ctx.dtypes = (x.dtype, v.dtype, None if vc is None else vc.dtype)
        return _launch_ode(backend, x, v, vc, table, step, next_off, guidance, None)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """dx = gout; dv = dt gout (split into the CFG pair when guided)."""
        b = gout.shape[0]
        _, dt, _ = sigma_terms_ref(ctx.table, ctx.step, b, 0.0, ctx.next_off, 0)
        gv = dt.reshape((b,) + (1,) * (gout.ndim - 1)) * gout.float()
        gx = gout.to(ctx.dtypes[0]) if ctx.needs_input_grad[5] else None
        if not ctx.cfg:
            return None, None, None, None, None, gx, gv.to(ctx.dtypes[1]), None
        g = ctx.guidance
        return None, None, None, None, None, gx, ((1 - g) * gv).to(ctx.dtypes[1]), (g * gv).to(ctx.dtypes[2])


class CFGCombineFunction(torch.autograd.Function):
    """out = v_u + g (v_c - v_u):  gv_u = (1 - g) gout,  gv_c = g gout."""

    @staticmethod
    def forward(ctx: Any, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """v_u + g (v_c - v_u), one launch."""
        ctx.scale, ctx.dtypes = scale, (v_uncond.dtype, v_cond.dtype)
        fwd = _cfg_combine_fwd_op if torch.compiler.is_compiling() else _cfg_combine_fwd
        return fwd(v_uncond, v_cond, float(scale))

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """d v_u = (1 - g) gout, d v_c = g gout."""
        g = gout.float()
        return (((1 - ctx.scale) * g).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                (ctx.scale * g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None, None)


# --------------------------------------------------------------------------------------------- public


def ode_step_indexed(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str = "triton",
    next_off: int = 1,
) -> torch.Tensor:
    """Graph-capturable Euler step x + (sigmas[step + next_off] - sigmas[step]) v (CFG fused when v is None).

    `step` is int32/int64 on x's device with 1 or B elements; `out` (no-grad only) may be x itself.
    """
    vv, vc = (v, None) if v is not None else (v_uncond, v_cond)
    if vv is None or (v is None and vc is None):
        raise ValueError("give v, or both v_uncond and v_cond")
    for t in (vv, vc):
        if t is not None and (t.shape != x.shape or t.device != x.device):
            raise ValueError(f"velocities must match x {tuple(x.shape)} on {x.device}")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    step = step.reshape(-1)
    if out is not None:
        _check_out(out, x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, vv, vc)):
        if out is not None:
            raise ValueError("out= is for no-grad rollouts; it cannot be combined with autograd")
        return ODEStepFunction.apply(backend, sigmas, step, next_off, float(guidance), x, vv, vc)
    return _launch_ode(backend, x, vv, vc, sigmas, step, next_off, guidance, out)


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
    *, backend: str = "triton",
) -> torch.Tensor:
    """Same arguments as `engine.ops.ode_step_ref` (per-row sigmas as floats or [B] tensors)."""
    b = x.shape[0]
    table = torch.cat([_per_row(sigma, b, x.device), _per_row(sigma_next, b, x.device)])
    return ode_step_indexed(x, v, table, torch.arange(b, device=x.device), backend=backend, next_off=b)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + g (v_c - v_u) in one pass (float32 math; promoted dtype out)."""
    if v_uncond.shape != v_cond.shape or v_uncond.device != v_cond.device:
        raise ValueError(f"shapes/devices differ: {tuple(v_uncond.shape)} vs {tuple(v_cond.shape)}")
    return CFGCombineFunction.apply(v_uncond, v_cond, float(scale))
