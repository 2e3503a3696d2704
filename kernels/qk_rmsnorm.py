"""Per-head QK RMSNorm of MMDiT joint attention, written straight into the joint [B, S, H, D] layout.

Input: one fused QKV projection per stream (image, text), each [B, S_i, 3*H*D] with q | k | v along the
last dim (heads inside each part), as produced by one GEMM against concatenated to_q/to_k/to_v weights.
Output: the joint q, k, v, each [B, S_0 + S_1 + ..., H, D] contiguous (the layout flash-attn, xformers and
PyTorch's SDPA flash kernel read without a transpose copy), stream i at tokens [off_i, off_i + S_i).
q and k of a stream are RMS-normalised per head (diffusers `RMSNorm(head_dim)`, optional weight), v is
copied. diffusers does this with view/transpose, an fp32 upcast RMSNorm (~6 kernels per tensor) and three
`torch.cat` copies; here it is one read and one write of the projections.

Rounding follows diffusers exactly: `x_hat = x * rsqrt(mean(x^2) + eps)` in fp32, rounded to the input dtype,
then multiplied by the weight (in the input dtype, i.e. rounded again): `y = rnd(rnd(x_hat) * w)`.

Layout: `joint_qk_rmsnorm_ref` (the diffusers composition, autograd) -> `_qk_rmsnorm_fwd_kernel` /
`_qk_rmsnorm_bwd_kernel` -> launchers (also registered as torch custom ops for torch.compile) -> a torch
implementation of the same forward/backward (used where Triton cannot run) -> `JointQKRMSNormFunction` ->
public `joint_qk_rmsnorm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kernels.buffers import empty
from kernels.runtime import interpreting, triton_importable, triton_runs_here, triton_runs_on

if triton_importable():
    import triton
    import triton.language as tl


def triton_usable(device: torch.device | None = None) -> bool:
    """Can the Triton kernel run on tensors of `device` (None: on this machine at all)? (kernels/runtime.py)"""
    return triton_runs_here() if device is None else triton_runs_on(device)


# ------------------------------------------------------------------------------------------------ reference


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers `RMSNorm.forward` (non-NPU branch), line for line."""
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(weight.dtype)
        return x * weight
    return x.to(input_dtype)


def joint_qk_rmsnorm_ref(
    ys: Sequence[torch.Tensor],
    q_weights: Sequence[torch.Tensor | None],
    k_weights: Sequence[torch.Tensor | None],
    norm_q: Sequence[bool],
    norm_k: Sequence[bool],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `JointAttnProcessor2_0` does between the projections and SDPA, returned as [B, S, H, D]."""
    qs, ks, vs = [], [], []
    for y, wq, wk, nq, nk in zip(ys, q_weights, k_weights, norm_q, norm_k):
        b, s, three_hd = y.shape
        d = three_hd // (3 * heads)
        q, k, v = (t.reshape(b, s, heads, d) for t in y.chunk(3, dim=-1))
        qs.append(rmsnorm_ref(q, wq, eps) if nq else q)
        ks.append(rmsnorm_ref(k, wk, eps) if nk else k)
        vs.append(v)
    return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)


# ------------------------------------------------------------------------------------------------ kernels

if triton_importable():

    @triton.jit
    def _round(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
        """fp32 -> dtype. The interpreter truncates fp32 -> bf16 (503 of 1024 randn values differ from torch,
        `fp_downcast_rounding="rtne"` included), so there RNE_BF16 rounds to nearest-even by hand first."""
        if RNE_BF16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _rms_fwd_tile(x, w_ptr, cols, col_mask, D, eps, HAS_W: tl.constexpr, RNE_BF16: tl.constexpr):
        """RMS-normalise the rows of an fp32 tile, rounding like diffusers (x_hat, then x_hat * w)."""
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x_hat = x * rstd[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
            x_hat = _round(x_hat, w.dtype, RNE_BF16).to(tl.float32) * w.to(tl.float32)
        return x_hat

    @triton.jit
    def _qk_rmsnorm_fwd_kernel(
        Y,  # [M, 3*H*D] this stream's fused projection (M = B*S rows; q | k | v), row stride stride_y
        WQ,  # [D] q norm weight (read only if HAS_WQ)
        WK,  # [D] k norm weight (read only if HAS_WK)
        Q,  # [B, S_total, H, D] joint query, contiguous; this stream owns tokens [off, off + S)
        K,  # [B, S_total, H, D] joint key, contiguous
        V,  # [B, S_total, H, D] joint value, contiguous
        M,
        S,
        S_total,
        off,
        H,
        D,
        stride_y,
        eps,
        NORM_Q: tl.constexpr,
        NORM_K: tl.constexpr,
        HAS_WQ: tl.constexpr,
        HAS_WK: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = (rows < M)[:, None] & col_mask[None, :]
        batch = rows // S
        out_rows = ((batch * S_total + off + rows - batch * S) * H + h).to(tl.int64)
        out_offs = out_rows[:, None] * D + cols[None, :]
        in_ptrs = Y + rows.to(tl.int64)[:, None] * stride_y + h * D + cols[None, :]
        hd = H * D

        x = tl.load(in_ptrs, mask=mask, other=0.0).to(tl.float32)
        if NORM_Q:
            x = _rms_fwd_tile(x, WQ, cols, col_mask, D, eps, HAS_WQ, RNE_BF16)
        tl.store(Q + out_offs, _round(x, Q.dtype.element_ty, RNE_BF16), mask=mask)

        x = tl.load(in_ptrs + hd, mask=mask, other=0.0).to(tl.float32)
        if NORM_K:
            x = _rms_fwd_tile(x, WK, cols, col_mask, D, eps, HAS_WK, RNE_BF16)
        tl.store(K + out_offs, _round(x, K.dtype.element_ty, RNE_BF16), mask=mask)

        v = tl.load(in_ptrs + 2 * hd, mask=mask, other=0.0)
        tl.store(V + out_offs, v, mask=mask)

    @triton.jit
    def _rms_bwd_tile(
        x, g, w_ptr, dw_ptr, cols, col_mask, D, eps, HAS_W: tl.constexpr, STORE_DW: tl.constexpr, RNE_BF16: tl.constexpr
    ):
        """dx of y = x_hat * w for an fp32 tile; optionally stores this tile's partial dw = sum_rows g * x_hat."""
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x_hat = x * rstd[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
            if STORE_DW:
                # diffusers multiplies the rounded x_hat by w, so dw sees the rounded x_hat
                dw = tl.sum(g * _round(x_hat, w.dtype, RNE_BF16).to(tl.float32), axis=0)
                tl.store(dw_ptr + cols, dw, mask=col_mask)
            g = g * w.to(tl.float32)
        c = tl.sum(g * x_hat, axis=1) / D
        return (g - x_hat * c[:, None]) * rstd[:, None]

    @triton.jit
    def _qk_rmsnorm_bwd_kernel(
        Y,  # [M, 3*H*D] the forward input (pre-norm q | k | v), row stride stride_y
        WQ,  # [D] q norm weight (read only if HAS_WQ)
        WK,  # [D] k norm weight (read only if HAS_WK)
        DQ,  # [B, S_total, H, D] grad of the joint query, contiguous
        DK,  # [B, S_total, H, D] grad of the joint key, contiguous
        DV,  # [B, S_total, H, D] grad of the joint value, contiguous
        DY,  # [M, 3*H*D] out: grad of Y, contiguous
        DWQ,  # [grid_m * H, BLOCK_D] out, fp32: per-program partial dwq (written only if STORE_DWQ)
        DWK,  # [grid_m * H, BLOCK_D] out, fp32: per-program partial dwk (written only if STORE_DWK)
        M,
        S,
        S_total,
        off,
        H,
        D,
        stride_y,
        eps,
        NORM_Q: tl.constexpr,
        NORM_K: tl.constexpr,
        HAS_WQ: tl.constexpr,
        HAS_WK: tl.constexpr,
        STORE_DWQ: tl.constexpr,
        STORE_DWK: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = (rows < M)[:, None] & col_mask[None, :]
        batch = rows // S
        out_rows = ((batch * S_total + off + rows - batch * S) * H + h).to(tl.int64)
        g_offs = out_rows[:, None] * D + cols[None, :]
        in_offs = rows.to(tl.int64)[:, None] * stride_y + h * D + cols[None, :]
        dy_offs = rows.to(tl.int64)[:, None] * (3 * H * D) + h * D + cols[None, :]
        dw_offs = (pid_m * H + h) * BLOCK_D
        hd = H * D

        g = tl.load(DQ + g_offs, mask=mask, other=0.0).to(tl.float32)
        if NORM_Q:
            x = tl.load(Y + in_offs, mask=mask, other=0.0).to(tl.float32)
            g = _rms_bwd_tile(x, g, WQ, DWQ + dw_offs, cols, col_mask, D, eps, HAS_WQ, STORE_DWQ, RNE_BF16)
        tl.store(DY + dy_offs, _round(g, DY.dtype.element_ty, RNE_BF16), mask=mask)

        g = tl.load(DK + g_offs, mask=mask, other=0.0).to(tl.float32)
        if NORM_K:
            x = tl.load(Y + in_offs + hd, mask=mask, other=0.0).to(tl.float32)
            g = _rms_bwd_tile(x, g, WK, DWK + dw_offs, cols, col_mask, D, eps, HAS_WK, STORE_DWK, RNE_BF16)
        tl.store(DY + dy_offs + hd, _round(g, DY.dtype.element_ty, RNE_BF16), mask=mask)

        g = tl.load(DV + g_offs, mask=mask, other=0.0)  # same dtype as DY: a copy, no rounding
        tl.store(DY + dy_offs + 2 * hd, g.to(DY.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def _block_m(m: int) -> int:
    # The interpreter costs ~1.5-2 ms per program instance whatever its size, so use few big programs there;
    # on a GPU 32 rows x 64 dims x 3 parts keeps ~6k programs in flight at 16 x 1024 tokens x 24 heads.
    if interpreting():
        return min(256, triton.next_power_of_2(max(m, 1)))
    return 32


def _joint_shape(ys: Sequence[torch.Tensor], heads: int) -> tuple[int, int, int]:
    b = ys[0].shape[0]
    s_total = sum(int(y.shape[1]) for y in ys)
    d = ys[0].shape[-1] // (3 * heads)
    for y in ys:
        if y.ndim != 3 or y.shape[0] != b or y.shape[-1] != 3 * heads * d:
            raise ValueError(f"stream projections must be [B, S_i, 3*H*D] with B={b}, H={heads}, D={d}: {y.shape}")
    return b, s_total, d


def _rows(y: torch.Tensor) -> torch.Tensor:
    """y as [M, 3HD] with unit column stride (a view when possible)."""
    y2 = y.reshape(-1, y.shape[-1])
    return y2 if y2.stride(-1) == 1 else y2.contiguous()


def _rne_bf16(y: torch.Tensor) -> bool:
    return interpreting() and y.dtype == torch.bfloat16


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=ref.device, dtype=ref.dtype)


def qk_rmsnorm_fwd_triton(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel once per stream into (new or given) joint q, k, v buffers."""
    b, s_total, d = _joint_shape(ys, heads)
    if out is None:
        out = tuple(empty((b, s_total, heads, d), ys[0].dtype, ys[0].device) for _ in range(3))
    q, k, v = out
    block_d = triton.next_power_of_2(d)
    off = 0
    for y, wq, wk, nq, nk in zip(ys, q_weights, k_weights, norm_q, norm_k):
        s = int(y.shape[1])
        y2 = _rows(y)
        m = y2.shape[0]
        block_m = _block_m(m)
        grid = (triton.cdiv(m, block_m), heads)
        _qk_rmsnorm_fwd_kernel[grid](
            y2, wq if wq is not None else _dummy(y2), wk if wk is not None else _dummy(y2), q, k, v,
            int(m), int(s), int(s_total), int(off), int(heads), int(d), int(y2.stride(0)), float(eps),
            NORM_Q=bool(nq), NORM_K=bool(nk), HAS_WQ=bool(nq and wq is not None), HAS_WK=bool(nk and wk is not None),
            RNE_BF16=_rne_bf16(y2), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        off += s
    return q, k, v


def qk_rmsnorm_bwd_triton(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    want_dw: list[bool],
    out: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Grads of every stream's projection, and of the norm weights where `want_dw[2*i + (0 q | 1 k)]`."""
    b, s_total, d = _joint_shape(ys, heads)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    block_d = triton.next_power_of_2(d)
    dys: list[torch.Tensor] = []
    dwqs: list[torch.Tensor | None] = []
    dwks: list[torch.Tensor | None] = []
    off = 0
    for i, (y, wq, wk, nq, nk) in enumerate(zip(ys, q_weights, k_weights, norm_q, norm_k)):
        s = int(y.shape[1])
        y2 = _rows(y)
        m = y2.shape[0]
        dy = out[i] if out is not None else empty((b, s, y.shape[-1]), y.dtype, y.device)
        block_m = _block_m(m)
        grid = (triton.cdiv(m, block_m), heads)
        has_wq, has_wk = bool(nq and wq is not None), bool(nk and wk is not None)
        store_q, store_k = has_wq and want_dw[2 * i], has_wk and want_dw[2 * i + 1]
        part = (grid[0] * heads, block_d)
        dwq = empty(part, torch.float32, y.device) if store_q else _dummy(y2).float()
        dwk = empty(part, torch.float32, y.device) if store_k else _dummy(y2).float()
        _qk_rmsnorm_bwd_kernel[grid](
            y2, wq if wq is not None else _dummy(y2), wk if wk is not None else _dummy(y2), dq, dk, dv, dy, dwq, dwk,
            int(m), int(s), int(s_total), int(off), int(heads), int(d), int(y2.stride(0)), float(eps),
            NORM_Q=bool(nq), NORM_K=bool(nk), HAS_WQ=has_wq, HAS_WK=has_wk, STORE_DWQ=store_q, STORE_DWK=store_k,
            RNE_BF16=_rne_bf16(y2), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        dys.append(dy)
        dwqs.append(dwq.sum(0)[:d].to(wq.dtype) if store_q else None)
        dwks.append(dwk.sum(0)[:d].to(wk.dtype) if store_k else None)
        off += s
    return dys, dwqs, dwks


# Custom ops so that torch.compile treats the launches as opaque nodes with known output shapes. Eager calls run
# the launchers directly (the op layer's dispatch costs ~94 us per call, see kernels/sde_step.py; two calls per
# attention layer and forward).
@torch.library.custom_op("flowopd::qk_rmsnorm_fwd", mutates_args=())
def _qk_rmsnorm_fwd_op(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_rmsnorm_fwd_triton(ys, q_weights, k_weights, norm_q, norm_k, heads, eps)


@_qk_rmsnorm_fwd_op.register_fake
def _(ys, q_weights, k_weights, norm_q, norm_k, heads, eps):
    b, s_total, d = _joint_shape(ys, heads)
    return tuple(ys[0].new_empty((b, s_total, heads, d)) for _ in range(3))


@torch.library.custom_op("flowopd::qk_rmsnorm_bwd", mutates_args=())
def _qk_rmsnorm_bwd_op(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    want_dw: list[bool],
) -> list[torch.Tensor]:
    dys, dwqs, dwks = qk_rmsnorm_bwd_triton(ys, q_weights, k_weights, norm_q, norm_k, heads, eps, dq, dk, dv, want_dw)
    # custom ops cannot return None (nor one tensor twice): absent weight grads come back as fresh empty tensors
    return dys + [g if g is not None else ys[0].new_empty(0) for pair in zip(dwqs, dwks) for g in pair]


@_qk_rmsnorm_bwd_op.register_fake
def _(ys, q_weights, k_weights, norm_q, norm_k, heads, eps, dq, dk, dv, want_dw):
    out = [y.new_empty(y.shape) for y in ys]
    for i, (wq, wk) in enumerate(zip(q_weights, k_weights)):
        for w, norm, want in ((wq, norm_q[i], want_dw[2 * i]), (wk, norm_k[i], want_dw[2 * i + 1])):
            out.append(w.new_empty(w.shape) if (w is not None and norm and want) else ys[0].new_empty(0))
    return out


# ------------------------------------------------------------------------------------------------ torch path


def _rms_fwd_torch(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x_hat = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x_hat * w if w is not None else x_hat


def qk_rmsnorm_fwd_torch(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's forward in PyTorch: same rounding, writes into the joint buffers (no cat)."""
    b, s_total, d = _joint_shape(ys, heads)
    q, k, v = (torch.empty((b, s_total, heads, d), device=ys[0].device, dtype=ys[0].dtype) for _ in range(3))
    off = 0
    for y, wq, wk, nq, nk in zip(ys, q_weights, k_weights, norm_q, norm_k):
        s = y.shape[1]
        parts = y.view(b, s, 3, heads, d)
        q[:, off : off + s] = _rms_fwd_torch(parts[:, :, 0], wq, eps) if nq else parts[:, :, 0]
        k[:, off : off + s] = _rms_fwd_torch(parts[:, :, 1], wk, eps) if nk else parts[:, :, 1]
        v[:, off : off + s] = parts[:, :, 2]
        off += s
    return q, k, v


def _rms_bwd_torch(
    x: torch.Tensor, g: torch.Tensor, w: torch.Tensor | None, eps: float, want_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, g = x.float(), g.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = x * rstd
    dw = None
    if w is not None:
        if want_dw:
            dw = (g * x_hat.to(w.dtype).float()).sum(dim=tuple(range(g.ndim - 1))).to(w.dtype)
        g = g * w.float()
    return (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd, dw


def qk_rmsnorm_bwd_torch(
    ys: list[torch.Tensor],
    q_weights: list[torch.Tensor | None],
    k_weights: list[torch.Tensor | None],
    norm_q: list[bool],
    norm_k: list[bool],
    heads: int,
    eps: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    want_dw: list[bool],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The PyTorch twin of the backward kernel: gradients into the projections and the norm weights."""
    b, _, d = _joint_shape(ys, heads)
    dys, dwqs, dwks = [], [], []
    off = 0
    for i, (y, wq, wk, nq, nk) in enumerate(zip(ys, q_weights, k_weights, norm_q, norm_k)):
        s = y.shape[1]
        parts = y.view(b, s, 3, heads, d)
        dy = torch.empty((b, s, 3, heads, d), device=y.device, dtype=y.dtype)
        gq, gk = dq[:, off : off + s], dk[:, off : off + s]
        dwq = dwk = None
        if nq:
            gq, dwq = _rms_bwd_torch(parts[:, :, 0], gq, wq, eps, want_dw[2 * i])
        if nk:
            gk, dwk = _rms_bwd_torch(parts[:, :, 1], gk, wk, eps, want_dw[2 * i + 1])
        dy[:, :, 0], dy[:, :, 1], dy[:, :, 2] = gq, gk, dv[:, off : off + s]
        dys.append(dy.view(b, s, -1))
        dwqs.append(dwq)
        dwks.append(dwk)
        off += s
    return dys, dwqs, dwks


# ------------------------------------------------------------------------------------------------ autograd


class JointQKRMSNormFunction(torch.autograd.Function):
    """Autograd over the per-stream projections (and norm weights, when they require grad).

    Backward of y = x_hat * w, x_hat = x * r, r = (mean_j x_j^2 + eps)^(-1/2) over the D dims of one head:
    with g' = g * w,  dL/dx_j = g'_j r + sum_i g'_i x_i (-r^3 x_j / D) = r (g'_j - x_hat_j * mean_i(g'_i x_hat_i)),
    dL/dw = sum over tokens and heads of g * x_hat.  v is a copy, so dv flows through unchanged.
    Only the stream projections are saved (r is recomputed from them: 64 dims per head row): 3 units of
    N x inner in the activation dtype per stream, where the diffusers composition saves ~8 (q and k, their
    fp32 upcasts at twice the size, and the bf16 x_hat of each).
    """

    @staticmethod
    def forward(ctx: Any, meta: tuple, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v in the joint [B, S, H, D] layout, q and k RMS-normalised per head."""
        n, norm_q, norm_k, heads, eps, use_triton = meta
        ys, wqs, wks = list(tensors[:n]), list(tensors[n : 2 * n]), list(tensors[2 * n :])
        if use_triton:
            fwd = _qk_rmsnorm_fwd_op if torch.compiler.is_compiling() else qk_rmsnorm_fwd_triton
            q, k, v = fwd(ys, wqs, wks, norm_q, norm_k, heads, eps)
        else:
            q, k, v = qk_rmsnorm_fwd_torch(ys, wqs, wks, norm_q, norm_k, heads, eps)
        ctx.meta = meta
        ctx.save_for_backward(*ys, *wqs, *wks)  # None entries are allowed and come back as None
        return q, k, v

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients into the projections and the norm weights."""
        n, norm_q, norm_k, heads, eps, use_triton = ctx.meta
        saved = ctx.saved_tensors
        ys, wqs, wks = list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n :])
        want_dw = [False] * (2 * n)
        for i in range(n):
            want_dw[2 * i] = bool(ctx.needs_input_grad[1 + n + i])
            want_dw[2 * i + 1] = bool(ctx.needs_input_grad[1 + 2 * n + i])
        if use_triton and not torch.compiler.is_compiling():
            dys, dwqs, dwks = qk_rmsnorm_bwd_triton(ys, wqs, wks, norm_q, norm_k, heads, eps, dq, dk, dv, want_dw)
        elif use_triton:
            flat = _qk_rmsnorm_bwd_op(ys, wqs, wks, norm_q, norm_k, heads, eps, dq, dk, dv, want_dw)
            dys = flat[:n]
            dwqs = [flat[n + 2 * i] if flat[n + 2 * i].numel() else None for i in range(n)]
            dwks = [flat[n + 2 * i + 1] if flat[n + 2 * i + 1].numel() else None for i in range(n)]
        else:
            dys, dwqs, dwks = qk_rmsnorm_bwd_torch(ys, wqs, wks, norm_q, norm_k, heads, eps, dq, dk, dv, want_dw)
        return (None, *dys, *dwqs, *dwks)


def joint_qk_rmsnorm(
    ys: Sequence[torch.Tensor],
    q_weights: Sequence[torch.Tensor | None],
    k_weights: Sequence[torch.Tensor | None],
    norm_q: Sequence[bool],
    norm_k: Sequence[bool],
    heads: int,
    eps: float,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint q, k, v [B, sum S_i, H, D] from per-stream fused projections [B, S_i, 3*H*D].

    `norm_q[i]`/`norm_k[i]`: whether stream i's q/k are RMS-normalised (weights may be None = no affine).
    `use_triton=None` runs the kernel where it can run (CUDA tensors, or CPU under TRITON_INTERPRET=1),
    else the PyTorch implementation of the same math.
    """
    n = len(ys)
    if not (len(q_weights) == len(k_weights) == len(norm_q) == len(norm_k) == n) or n == 0:
        raise ValueError("one q weight, k weight and norm flag per stream")
    for w in (*q_weights, *k_weights):
        if w is not None and (w.dtype != ys[0].dtype or w.ndim != 1):
            raise ValueError(f"norm weights must be 1-d in the activations' dtype {ys[0].dtype}, got {w.dtype}")
    if use_triton is None:
        use_triton = triton_usable(ys[0].device)
    meta = (n, [bool(x) for x in norm_q], [bool(x) for x in norm_k], int(heads), float(eps), bool(use_triton))
    return JointQKRMSNormFunction.apply(meta, *ys, *q_weights, *k_weights)
