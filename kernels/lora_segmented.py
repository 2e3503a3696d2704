"""Segmented multi-LoRA linear (SGMV-style): one base GEMM for all rows + per-segment LoRA shrink/expand.

    y[b] = x[b] W^T + bias + s_i (x[b] A_i^T) B_i^T     for batch rows b of a segment with adapter slot i >= 0
    y[b] = x[b] W^T + bias                              for rows of a slot -1 segment, or of no segment

x is [B, T, K] (or [B, K]; more middle dims are flattened): the first dim holds the rows that segments index
(one image of the batch), the T tokens of a row share its adapter, as diffusers' attention processors call
`attn.to_q(hidden_states)` with hidden_states [B, S, D]. Adapters are stacked and zero-padded to the largest
rank: `lora_a` [n, R, K], `lora_b` [n, N, R], `scales` [n] float32 (alpha_i / r_i); zero padding makes a
rank-r_i adapter exact at R > r_i. Segment metadata are device tensors: `seg_indptr` [n_seg + 1] int32 (row
boundaries, nondecreasing, last <= B) and `seg_adapter` [n_seg] int32 (slot or -1); pad with empty segments
to keep n_seg fixed. Nothing here reads them on the host, and every grid is sized from shapes only, so a
launch is CUDA-graph safe.

Kernels (the public multi-LoRA serving layout, Punica SGMV / vLLM lora_shrink + lora_expand):
- shrink `h = x A_i^T` [M, R] (M = B*T token rows), one program per BLOCK_M rows; a program walks the
  segment list and handles every segment that overlaps its rows (rows are grouped by adapter, so a tile
  straddles at most a few segments), so no program is launched per (segment, tile) pair that is empty;
- expand `y += s_i h B_i^T` accumulated into the base output that cuBLAS wrote (F.linear): y is read and
  written once by the accumulate and there is no [M, N] delta tensor;
- wgrad (backward only) `sum over rows of one slot of P^T Q`, split over row blocks, summed in torch.
The backward reuses shrink/expand on transposed (strided) views of the stacks; see `LoraSegmentedFunction`.

On CPU the interpreter runs these kernels (TRITON_INTERPRET=1, tests) where bf16 `tl.dot` is wrong, so the
operands are upcast to float32 there. `lora_segmented_torch` is the batched gather/bmm fallback used where
Triton cannot run; `lora_segmented_ref` the per-segment float64 reference the tests trust.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.buffers import empty
from kernels.runtime import interpreting, triton_importable, triton_runs_here, triton_runs_on

HAS_TRITON = triton_importable()  # kept for importers of this name; kernels/runtime.py holds the rule
if HAS_TRITON:
    import triton
    import triton.language as tl

# Whether the Triton kernels can run here at all (a GPU, or the CPU interpreter): the name the tests import.
triton_available = triton_runs_here


# --------------------------------------------------------------------------------------------- references


def _row_slots(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, rows: int) -> torch.Tensor:
    """Adapter slot of every batch row [rows] (int64, -1 = none), on device without a host sync."""
    b = torch.arange(rows, device=seg_indptr.device, dtype=seg_indptr.dtype)
    seg = torch.searchsorted(seg_indptr, b, right=True) - 1
    inside = (seg >= 0) & (seg < seg_adapter.numel())
    slot = seg_adapter.to(torch.int64)[seg.clamp(0, max(seg_adapter.numel() - 1, 0))]
    return torch.where(inside, slot, torch.full_like(slot, -1))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., C] as a 3-D [B, T, C] (a view where possible; 2-D input gets T = 1)."""
    if t.ndim == 2:
        return t.unsqueeze(1)
    if t.ndim == 3:
        return t
    return t.reshape(t.shape[0], -1, t.shape[-1])


def lora_segmented_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    upcast: bool = True,
) -> torch.Tensor:
    """One GEMM per segment, in float64 when `upcast` (the reference; reads the metadata on the host)."""
    dt = torch.float64 if upcast else x.dtype
    y = F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    bounds = seg_indptr.tolist()
    for s, slot in enumerate(seg_adapter.tolist()):
        lo, hi = bounds[s], bounds[s + 1]
        if slot < 0 or hi <= lo:
            continue
        h = x[lo:hi].to(dt) @ lora_a[slot].to(dt).T
        y[lo:hi] = y[lo:hi] + scales[slot].to(dt) * (h @ lora_b[slot].to(dt).T)
    return y


def lora_segmented_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    trainable: int | None = None,
) -> torch.Tensor:
    """Batched gather + bmm implementation (no per-adapter loop, no host sync): the CPU fallback.

    Each row gathers its adapter's A and B ([B, R, K] + [B, N, R] extra memory) and runs two bmm; rows
    without adapter use slot 0 at scale 0. With `trainable` set, weight gradients reach only that slot.
    """
    slots = _row_slots(seg_indptr, seg_adapter, x.shape[0])
    safe = slots.clamp(min=0)
    if trainable is not None and (lora_a.requires_grad or lora_b.requires_grad):
        keep = torch.zeros(lora_a.shape[0], dtype=torch.bool, device=lora_a.device)
        keep[trainable] = True
        lora_a = torch.where(keep[:, None, None], lora_a, lora_a.detach())
        lora_b = torch.where(keep[:, None, None], lora_b, lora_b.detach())
    x3 = _as_rows(x)
    a = lora_a[safe].to(x.dtype)
    b = lora_b[safe].to(x.dtype)
    s = torch.where(slots >= 0, scales.float()[safe], torch.zeros((), device=scales.device))
    h = torch.bmm(x3, a.transpose(1, 2))
    delta = torch.bmm(h, b.transpose(1, 2)).float() * s[:, None, None]
    y = F.linear(x3, weight, bias)
    return (y.float() + delta).to(y.dtype).reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------ kernels

if HAS_TRITON:

    @triton.jit
    def _cast_for(v, out_ptr, UPCAST: tl.constexpr):
        """v (float32) in the element type of out_ptr, rounded to nearest even."""
        if UPCAST:
            if out_ptr.dtype.element_ty == tl.bfloat16:
                # The interpreter truncates float32 -> bf16 (2x the error of a GPU's round-to-nearest-even,
                # measured 0.031 vs 0.012 max on N(0,1) dot products): round the bits first.
                bits = v.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                v = bits.to(tl.float32, bitcast=True)
        return v.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr,  # [B, T, K] input rows, any strides; token row m is (m // T, m % T)
        w_ptr,  # [n, R, K] stacked down-projections (A, or B^T in the backward), any strides
        h_ptr,  # [M, R] output h = x w_slot^T; rows of slot -1 / no segment are not written
        seg_ptr,  # [n_seg + 1] int32 segment boundaries in batch rows
        sid_ptr,  # [n_seg] int32 adapter slot of each segment, -1 = no adapter
        M,
        K,
        R,
        T,
        n_seg,
        stride_xb,
        stride_xt,
        stride_xk,
        stride_wn,
        stride_wr,
        stride_wk,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        m_lo = tl.program_id(0) * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)
        x_rows = x_ptr + (rows // T) * stride_xb + (rows % T) * stride_xt
        for s in range(n_seg):
            lo = tl.load(seg_ptr + s) * T
            hi = tl.load(seg_ptr + s + 1) * T
            slot = tl.load(sid_ptr + s)
            if (slot >= 0) & (lo < m_lo + BLOCK_M) & (hi > m_lo):
                m_mask = (offs_m >= lo) & (offs_m < hi) & (offs_m < M)
                w_base = w_ptr + slot.to(tl.int64) * stride_wn
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + offs_k
                    xt = tl.load(
                        x_rows[:, None] + kk[None, :] * stride_xk,
                        mask=m_mask[:, None] & (kk[None, :] < K),
                        other=0.0,
                    )
                    wt = tl.load(  # [BLOCK_K, BLOCK_R] tile of w_slot^T
                        w_base + offs_r[None, :] * stride_wr + kk[:, None] * stride_wk,
                        mask=(offs_r[None, :] < R) & (kk[:, None] < K),
                        other=0.0,
                    )
                    if UPCAST:
                        xt = xt.to(tl.float32)
                        wt = wt.to(tl.float32)
                    acc += tl.dot(xt, wt, input_precision=DOT_PRECISION)
                h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_r[None, :]
                tl.store(h_ptrs, _cast_for(acc, h_ptr, UPCAST), mask=m_mask[:, None] & (offs_r[None, :] < R))

    @triton.jit
    def _lora_expand_kernel(
        h_ptr,  # [M, R] rank-space rows (shrink output), unit stride along R
        w_ptr,  # [n, N, R] stacked up-projections (B, or A^T in the backward), any strides
        y_ptr,  # [B, T, N] output accumulated in place, y += s_slot h w_slot^T; other rows untouched
        scale_ptr,  # [n] float32 per-adapter scale s_i
        seg_ptr,  # [n_seg + 1] int32 segment boundaries in batch rows
        sid_ptr,  # [n_seg] int32 adapter slot of each segment, -1 = no adapter
        M,
        N,
        R,
        T,
        n_seg,
        stride_hm,
        stride_wn,
        stride_wo,
        stride_wr,
        stride_yb,
        stride_yt,
        stride_yn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        m_lo = tl.program_id(0) * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        rows = offs_m.to(tl.int64)
        y_rows = y_ptr + (rows // T) * stride_yb + (rows % T) * stride_yt
        for s in range(n_seg):
            lo = tl.load(seg_ptr + s) * T
            hi = tl.load(seg_ptr + s + 1) * T
            slot = tl.load(sid_ptr + s)
            if (slot >= 0) & (lo < m_lo + BLOCK_M) & (hi > m_lo):
                m_mask = (offs_m >= lo) & (offs_m < hi) & (offs_m < M)
                ht = tl.load(
                    h_ptr + rows[:, None] * stride_hm + offs_r[None, :],
                    mask=m_mask[:, None] & (offs_r[None, :] < R),
                    other=0.0,
                )
                wt = tl.load(  # [BLOCK_R, BLOCK_N] tile of w_slot^T
                    w_ptr + slot.to(tl.int64) * stride_wn + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wo,
                    mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
                    other=0.0,
                )
                if UPCAST:
                    ht = ht.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(ht, wt, input_precision=DOT_PRECISION) * tl.load(scale_ptr + slot)
                y_ptrs = y_rows[:, None] + offs_n[None, :] * stride_yn
                mask = m_mask[:, None] & (offs_n[None, :] < N)
                y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_ptrs, _cast_for(y + acc, y_ptr, UPCAST), mask=mask)

    @triton.jit
    def _lora_wgrad_kernel(
        p_ptr,  # [M, R] rank-space rows (h or u), unit stride along R
        q_ptr,  # [B, T, N] full-width rows (x or the output gradient), any strides
        out_ptr,  # [SPLIT, R, N] float32 partial sums of p^T q over the rows of slot `target`
        seg_ptr,  # [n_seg + 1] int32 segment boundaries in batch rows
        sid_ptr,  # [n_seg] int32 adapter slot of each segment, -1 = no adapter
        target,
        N,
        R,
        T,
        n_seg,
        stride_pm,
        stride_qb,
        stride_qt,
        stride_qn,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for s in range(n_seg):
            slot = tl.load(sid_ptr + s)
            if slot == target:
                lo = tl.load(seg_ptr + s) * T
                hi = tl.load(seg_ptr + s + 1) * T
                for m0 in range(lo + split * BLOCK_M, hi, SPLIT * BLOCK_M):
                    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                    m_mask = rows < hi
                    pt = tl.load(  # [BLOCK_R, BLOCK_M] tile of p^T
                        p_ptr + rows[None, :] * stride_pm + offs_r[:, None],
                        mask=m_mask[None, :] & (offs_r[:, None] < R),
                        other=0.0,
                    )
                    q_rows = q_ptr + (rows // T) * stride_qb + (rows % T) * stride_qt
                    qt = tl.load(
                        q_rows[:, None] + offs_n[None, :] * stride_qn,
                        mask=m_mask[:, None] & (offs_n[None, :] < N),
                        other=0.0,
                    )
                    if UPCAST:
                        pt = pt.to(tl.float32)
                        qt = qt.to(tl.float32)
                    acc += tl.dot(pt, qt, input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + split * R * N + offs_r[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=(offs_r[:, None] < R) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------- launchers

# Fixed tiles, not autotuned (autotune needs a GPU to time on). The shrink/expand are memory-bound (R <= 128
# columns of work per row), so 64-row tiles keep >= 1000 programs in flight at 512 px batch sizes (M ~ 1e5).
_BLOCK_M = 64
_BLOCK_K = 64
_BLOCK_N = 64


def _kernel_flags(dtype: torch.dtype) -> dict:
    # tf32 would cost ~1e-3 relative error on fp32 inputs; ieee keeps fp32 runs comparable to torch.
    return dict(UPCAST=interpreting(), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


def _shrink(
    x3: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[m] = x[m] w_slot^T for rows with an adapter; `w_strides` = (adapter, rank, input) strides of w."""
    b, t, k = x3.shape
    m, r = out.shape
    if m == 0 or seg_adapter.numel() == 0:
        return out
    grid = (triton.cdiv(m, _BLOCK_M),)
    _lora_shrink_kernel[grid](
        x3, w, out, seg_indptr, seg_adapter,
        m, k, r, t, seg_adapter.numel(),
        *x3.stride(), *w_strides, out.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_R=_block_r(r), **_kernel_flags(x3.dtype),
    )  # fmt: skip
    return out


def _expand(
    h: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    y3: torch.Tensor,
) -> torch.Tensor:
    """y[m] += s_slot h[m] w_slot^T in place; `w_strides` = (adapter, output, rank) strides of w."""
    b, t, n = y3.shape
    m, r = h.shape
    if m == 0 or seg_adapter.numel() == 0:
        return y3
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _lora_expand_kernel[grid](
        h, w, y3, scales, seg_indptr, seg_adapter,
        m, n, r, t, seg_adapter.numel(),
        h.stride(0), *w_strides, *y3.stride(),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=_block_r(r), **_kernel_flags(h.dtype),
    )  # fmt: skip
    return y3


def _wgrad(
    p: torch.Tensor, q3: torch.Tensor, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, target: int
) -> torch.Tensor:
    """sum over the rows of slot `target` of p[m]^T q[m]: [R, N] float32."""
    b, t, n = q3.shape
    m, r = p.shape
    # Row-block split: the N / 64 column programs alone (24 at N = 1536) would idle most of 132 SMs.
    split = max(1, min(32, triton.cdiv(m, 8 * _BLOCK_M)))
    part = empty((split, r, n), torch.float32, p.device)
    if seg_adapter.numel() == 0 or m == 0:
        return part.zero_().sum(0)
    grid = (triton.cdiv(n, _BLOCK_N), split)
    _lora_wgrad_kernel[grid](
        p, q3, part, seg_indptr, seg_adapter,
        int(target), n, r, t, seg_adapter.numel(),
        p.stride(0), *q3.stride(),
        SPLIT=split, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=_block_r(r), **_kernel_flags(p.dtype),
    )  # fmt: skip
    return part.sum(0)


# Custom ops, so that torch.compile sees the forward and the backward each as one opaque node (fake impls give
# the output shapes). Absent gradients come back as 0-element tensors (a custom op cannot return None). Eager
# calls run the functions directly (the op layer's dispatch costs ~94 us per call, see kernels/sde_step.py).


def _lora_segmented_fwd(
    x3: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y3 [B, T, N], h [B*T, R]): the base GEMM, then shrink and expand accumulated into it."""
    b, t, k = x3.shape
    n, r, _ = lora_a.shape
    y3 = F.linear(x3, weight, bias)
    h = empty((b * t, r), x3.dtype, x3.device)  # rows without adapter stay unwritten (and unread)
    _shrink(x3, lora_a, tuple(lora_a.stride()), seg_indptr, seg_adapter, h)
    _expand(h, lora_b, tuple(lora_b.stride()), scales, seg_indptr, seg_adapter, y3)
    return y3, h


_lora_segmented_fwd_op = torch.library.custom_op("flowopd::lora_segmented_fwd", _lora_segmented_fwd, mutates_args=())


@_lora_segmented_fwd_op.register_fake
def _(x3, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter):
    b, t, _ = x3.shape
    return x3.new_empty((b, t, weight.shape[0])), x3.new_empty((b * t, lora_a.shape[1]))


def _lora_segmented_bwd(
    x3: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    h: torch.Tensor,
    gy: torch.Tensor,
    trainable: int,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx3 [B, T, K], dA, dB); `trainable` -1 = every slot (see LoraSegmentedFunction)."""
    g3 = _as_rows(gy.to(x3.dtype))
    n, r, _ = lora_a.shape
    u = None
    if need_x or need_a:
        u = empty((h.shape[0], r), h.dtype, h.device)
        bt = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))  # B_i^T as an [R, N] "A"
        _shrink(g3, lora_b, bt, seg_indptr, seg_adapter, u)
    dx3 = x3.new_empty(0)
    if need_x:
        dx3 = torch.matmul(g3, weight)
        at = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))  # A_i^T as a [K, R] "B"
        _expand(u, lora_a, at, scales, seg_indptr, seg_adapter, dx3)
    slots = range(n) if trainable < 0 else (trainable,)
    da = db = None
    if need_a:
        da = torch.zeros_like(lora_a)
        for i in slots:
            da[i] = (_wgrad(u, x3, seg_indptr, seg_adapter, i) * scales[i]).to(da.dtype)
    if need_b:
        db = torch.zeros_like(lora_b)
        for i in slots:
            db[i] = (_wgrad(h, g3, seg_indptr, seg_adapter, i) * scales[i]).T.to(db.dtype)
    return dx3, lora_a.new_empty(0) if da is None else da, lora_b.new_empty(0) if db is None else db


_lora_segmented_bwd_op = torch.library.custom_op("flowopd::lora_segmented_bwd", _lora_segmented_bwd, mutates_args=())


@_lora_segmented_bwd_op.register_fake
def _(x3, weight, lora_a, lora_b, scales, seg_indptr, seg_adapter, h, gy, trainable, need_x, need_a, need_b):
    dx3 = x3.new_empty((*x3.shape[:2], weight.shape[1])) if need_x else x3.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_a else lora_a.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_b else lora_b.new_empty(0)
    return dx3, da, db


# ----------------------------------------------------------------------------------------------- autograd


class LoraSegmentedFunction(torch.autograd.Function):
    """Forward: y = F.linear(x, W, bias) (cuBLAS) then shrink h = x A_i^T and expand y += s_i h B_i^T.

    Backward, for a row x (one token) of a segment with adapter i, h = A_i x, y = W x + bias + s_i B_i h,
    and the incoming gradient g = dL/dy:
        dL/dx   = W^T g + s_i A_i^T (B_i^T g)         -> u = B_i^T g (shrink of g with B^T),
                                                         dx = g W (torch) then dx += s_i u A_i (expand with A^T)
        dL/dA_i = sum_rows s_i (B_i^T g) x^T = s_i sum u x^T      (wgrad of u and x, [R, K])
        dL/dB_i = sum_rows s_i g (A_i x)^T   = s_i sum g h^T      (wgrad of h and g, [R, N], transposed)
    where the sums run over the token rows of every segment with slot i. W and bias are frozen (no grads;
    `lora_segmented` refuses a trainable base). Weight grads are computed only for slot `trainable` when
    given (the student), else for every slot; other slots get zeros. Rows without adapter contribute
    dx = W^T g only. h is saved from the forward ([M, R], in x's dtype, as peft's lora_B input is).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scales: torch.Tensor,
        seg_indptr: torch.Tensor,
        seg_adapter: torch.Tensor,
        trainable: int | None,
    ) -> torch.Tensor:
        """The segmented forward (one base GEMM + each segment's LoRA); keeps the shrink output for backward."""
        x3 = _as_rows(x)
        fwd = _lora_segmented_fwd_op if torch.compiler.is_compiling() else _lora_segmented_fwd
        y3, h = fwd(x3, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter)
        ctx.save_for_backward(x3, weight, lora_a, lora_b, scales, seg_indptr, seg_adapter, h)
        ctx.trainable = trainable
        ctx.x_shape = x.shape
        return y3.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """dx, and dA / dB of the trainable slot (all slots when trainable is None); the base gets none."""
        x3, weight, lora_a, lora_b, scales, seg_indptr, seg_adapter, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        trainable = -1 if ctx.trainable is None else int(ctx.trainable)
        bwd = _lora_segmented_bwd_op if torch.compiler.is_compiling() else _lora_segmented_bwd
        dx3, da, db = bwd(x3, weight, lora_a, lora_b, scales, seg_indptr, seg_adapter, h, gy, trainable, need_x, need_a,
                          need_b)
        dx = dx3.reshape(ctx.x_shape) if need_x else None
        return dx, None, None, da if need_a else None, db if need_b else None, None, None, None, None


def lora_segmented(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    trainable: int | None = None,
) -> torch.Tensor:
    """y = x W^T + bias + s_i (x A_i^T) B_i^T per segment (module docstring); Triton where it can run on x.

    `trainable`: the one adapter slot whose A/B receive gradients (others get zeros); None = all slots.
    Falls back to `lora_segmented_torch` where Triton cannot run on x's device.
    """
    n, r, k = lora_a.shape
    if x.shape[-1] != k or weight.shape[1] != k or lora_b.shape != (n, weight.shape[0], r):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}"
        )
    if scales.shape != (n,) or seg_indptr.numel() != seg_adapter.numel() + 1:
        raise ValueError(f"scales {tuple(scales.shape)} for {n} adapters, {seg_adapter.numel()} segments with "
                         f"{seg_indptr.numel()} boundaries")  # fmt: skip
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lora_segmented computes no base-weight gradients: freeze weight and bias")
    if not triton_runs_on(x):
        return lora_segmented_torch(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter, trainable)
    dtype = x.dtype
    return LoraSegmentedFunction.apply(
        x,
        weight,
        bias,
        lora_a.to(dtype),
        lora_b.to(dtype),
        scales.to(torch.float32).contiguous(),
        seg_indptr.to(torch.int32).contiguous(),
        seg_adapter.to(torch.int32).contiguous(),
        trainable,
    )
