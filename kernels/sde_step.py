"""Fused SDE step of Flow-GRPO / Flow-OPD rollouts (DESIGN §1): one launch (+ a [B]-sized reduction launch).

    v   = v_u + g (v_c - v_u)                   (CFG fused; or v given)
    s   = a sqrt(sigma / (1 - sigma~)),  sigma~ = sigma except sigma~ = sigma_1 where sigma == 1
    mu  = x + (v + s^2/(2 sigma) (x + (1 - sigma) v)) dt,        dt = sigma_next - sigma < 0
    x'  = mu + s sqrt(-dt) eps                  (eps given, or Philox in-kernel; or x' = prev_sample given)
    log p(x'|x) = -sum_CHW (x' - mu)^2 / (2 s^2 (-dt) N) - log(s sqrt(-dt)) - log(2 pi)/2,   N = C*H*W

Sigmas come from a device table indexed by a device step tensor: sigma = table[step[b]], sigma_next =
table[step[b] + next_off], sigma_1 = table[sig1_idx]. With the schedule as table (next_off = sig1_idx = 1)
nothing is read on the host and every grid is sized from shapes only, so the step is CUDA-graph capturable;
seed and offset of the noise are device tensors too (a replay draws new noise after `seed.copy_(...)`).
Math is float32 for float32/bfloat16/float16 inputs (mixed dtypes allowed); x' and mu come back in x's dtype.

Noise (kernels/philox.py): element n of row b takes lane n // Q of the Philox call for group g = n % Q, so a
program handles BLOCK_G groups and the 4 matching lanes: 4 contiguous 1-D blocks per tensor, one Philox per 4
elements. The log-prob is reduced without atomics: every program writes the sum of (x' - mu)^2 over its
elements to partial[b, pid], a second kernel adds a row's partials in a fixed order (bitwise reproducible).

The `cuda` backend runs the same forward from csrc/ (torch.ops.flowopd.sde_step_fwd); both share the Triton
backward (see `SDEStepFunction`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from kernels.buffers import empty
from kernels.philox import noise_groups, philox_normal_ref
from kernels.runtime import triton_importable
from kernels.runtime import triton_runs_on as triton_runs_on  # re-exported: the one rule lives in runtime.py

if triton_importable():
    import triton
    import triton.language as tl

    from kernels.philox import philox_normal4

NOISE_PHILOX, NOISE_GIVEN, NOISE_PREV = 0, 1, 2
_BLOCK_G = 1024  # groups per program = 4096 elements: 8 contiguous bf16 (16 B) per thread per lane at 4 warps
_BLOCK_P = 128  # partials per iteration of the row reduction (P = 64 per row at 16x128x128)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class SDEStepResult(NamedTuple):
    """What a fused SDE step returns."""

    sample: torch.Tensor
    """x' in x's dtype (prev_sample itself, detached, when it was given in x's dtype)."""
    mean: torch.Tensor | None
    """mu in x's dtype; None when return_mean=False."""
    log_prob: torch.Tensor
    """log p(x'|x) float32 [B]."""
    std: torch.Tensor
    """s float32 [B] (the noise std of the step is s sqrt(-dt))."""


_empty = empty  # output buffers: NaN-poisoned under FLOWOPD_POISON=1 (kernels/buffers.py)


# --------------------------------------------------------------------------------------------- reference


def sigma_terms_ref(
    table: torch.Tensor, step: torch.Tensor, rows: int, noise_level: float, next_off: int = 1, sig1_idx: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, dt, s) per row [rows] from a sigma table and step indices ([], [1] or [rows])."""
    k = step.reshape(-1).to(torch.int64).expand(rows)
    t = table.to(dtype)
    sigma, sigma_next, sigma_1 = t[k], t[k + next_off], t[sig1_idx]
    s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_1, sigma)))
    return sigma, sigma_next - sigma, s


def sde_step_indexed_ref(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
    return_mean: bool = True,
    next_off: int = 1,
    sig1_idx: int = 1,
    compute_dtype: torch.dtype = torch.float32,
) -> SDEStepResult:
    """The unfused PyTorch chain of the op (any device; float64 with compute_dtype for the tests).

    Without `noise` and `prev_sample` the noise is `philox_normal_ref(seed, offset, x.shape)`, the stream the
    kernels generate. Gradients flow into v (or v_u, v_c) and x through mu, log_prob and x'.
    """
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    xf = x.to(compute_dtype)
    vf = v.to(compute_dtype) if v is not None else _cfg_ref(v_uncond, v_cond, guidance, compute_dtype)
    sigma, dt, s = (t.reshape(shape) for t in sigma_terms_ref(sigmas, step, b, noise_level, next_off, sig1_idx,
                                                              compute_dtype))
    mean = xf + (vf + s * s / (2 * sigma) * (xf + (1 - sigma) * vf)) * dt
    std = s * torch.sqrt(-dt)
    if prev_sample is not None:
        sample = prev_sample.detach().to(compute_dtype)
    else:
        if noise is None:
            noise = philox_normal_ref(seed, offset, x.shape, x.device)
        sample = mean + std * noise.to(compute_dtype)
    lp = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return SDEStepResult(
        sample=sample.to(x.dtype),
        mean=mean.to(x.dtype) if return_mean else None,
        log_prob=lp.mean(dim=tuple(range(1, x.ndim))).to(torch.float32),
        std=s.reshape(-1).to(torch.float32),
    )


def _cfg_ref(v_u: torch.Tensor | None, v_c: torch.Tensor | None, g: float, dtype: torch.dtype) -> torch.Tensor:
    if v_u is None or v_c is None:
        raise ValueError("give v, or both v_uncond and v_cond")
    v_u = v_u.to(dtype)
    return v_u + g * (v_c.to(dtype) - v_u)


# --------------------------------------------------------------------------------------------- Triton kernels

if triton_importable():

    @triton.jit
    def _sigma_terms(sig_ptr, step_ptr, row, step_stride, next_off, sig1_idx, noise_level):
        """(sigma, dt, s, std) of one row; sig_ptr: float32 table, step_ptr: int step index per row."""
        k = tl.load(step_ptr + row * step_stride).to(tl.int64)
        sigma = tl.load(sig_ptr + k)
        dt = tl.load(sig_ptr + k + next_off) - sigma
        sigma_1 = tl.load(sig_ptr + sig1_idx)
        s = noise_level * tl.sqrt_rn(sigma / (1.0 - tl.where(sigma == 1.0, sigma_1, sigma)))
        return sigma, dt, s, s * tl.sqrt_rn(-dt)

    @triton.jit
    def _fwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, sample_ptr, mean_ptr, offs, mask, z, sigma, dt, s, std, guidance,
                  NOISE: tl.constexpr, CFG: tl.constexpr, WRITE_MEAN: tl.constexpr):
        """One lane block: writes x' (and mu), returns (x' - mu)^2 (0 where masked)."""
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            v = v + guidance * (tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32) - v)
        mean = x + (v + s * s / (2.0 * sigma) * (x + (1.0 - sigma) * v)) * dt
        if NOISE == 2:
            d = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
        else:
            if NOISE == 1:
                z = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = std * z
            tl.store(sample_ptr + offs, (mean + d).to(sample_ptr.dtype.element_ty), mask=mask)
        if WRITE_MEAN:
            tl.store(mean_ptr + offs, mean.to(mean_ptr.dtype.element_ty), mask=mask)
        return tl.where(mask, d * d, 0.0)

    @triton.jit
    def _sde_step_fwd_kernel(
        x_ptr,  # [B, N] state x, any float dtype
        v_ptr,  # [B, N] velocity v, or v_u with CFG
        vc_ptr,  # [B, N] v_c with CFG (else an unused alias of v_ptr)
        aux_ptr,  # [B, N] eps (NOISE=1) or prev_sample (NOISE=2); unused alias for NOISE=0
        sample_ptr,  # [B, N] out x' in x's dtype (unused for NOISE=2)
        mean_ptr,  # [B, N] out mu in x's dtype (WRITE_MEAN only)
        part_ptr,  # [B, P] out float32 partial sums of (x' - mu)^2, one per program
        sig_ptr,  # float32 sigma table
        step_ptr,  # int32/int64 step index per row (stride step_stride: 0 = shared)
        seed_ptr,  # int64 Philox key per row (stride seed_stride: 0 = shared)
        offset_ptr,  # int64 [1] Philox counter words 2-3
        N, Q, P, step_stride, seed_stride, next_off, sig1_idx, noise_level, guidance,
        BLOCK_G: tl.constexpr, NOISE: tl.constexpr, CFG: tl.constexpr, WRITE_MEAN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.program_id(1)
        sigma, dt, s, std = _sigma_terms(sig_ptr, step_ptr, row, step_stride, next_off, sig1_idx, noise_level)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < Q
        if NOISE == 0:
            seed = tl.load(seed_ptr + row * seed_stride)
            z0, z1, z2, z3 = philox_normal4(seed, tl.load(offset_ptr), g, row * (1 - seed_stride))
        else:
            z0 = tl.zeros([BLOCK_G], tl.float32)
            z1 = z0
            z2 = z0
            z3 = z0
        base = row.to(tl.int64) * N
        acc = _fwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, sample_ptr, mean_ptr, base + g, gmask & (g < N), z0,
                        sigma, dt, s, std, guidance, NOISE, CFG, WRITE_MEAN)
        acc += _fwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, sample_ptr, mean_ptr, base + Q + g, gmask & (Q + g < N),
                         z1, sigma, dt, s, std, guidance, NOISE, CFG, WRITE_MEAN)
        acc += _fwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, sample_ptr, mean_ptr, base + 2 * Q + g,
                         gmask & (2 * Q + g < N), z2, sigma, dt, s, std, guidance, NOISE, CFG, WRITE_MEAN)
        acc += _fwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, sample_ptr, mean_ptr, base + 3 * Q + g,
                         gmask & (3 * Q + g < N), z3, sigma, dt, s, std, guidance, NOISE, CFG, WRITE_MEAN)
        tl.store(part_ptr + row * P + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _sde_logprob_kernel(
        part_ptr,  # [B, P] float32 partial sums of (x' - mu)^2
        logp_ptr,  # [B] out float32 log p(x'|x)
        std_ptr,  # [B] out float32 s
        sig_ptr,  # float32 sigma table
        step_ptr,  # int step index per row (stride step_stride)
        N, P, step_stride, next_off, sig1_idx, noise_level,
        BLOCK_P: tl.constexpr,
    ):
        row = tl.program_id(0)
        acc = tl.zeros([BLOCK_P], tl.float32)
        for start in range(0, P, BLOCK_P):
            idx = start + tl.arange(0, BLOCK_P)
            acc += tl.load(part_ptr + row * P + idx, mask=idx < P, other=0.0)
        ssq = tl.sum(acc, axis=0)
        sigma, dt, s, std = _sigma_terms(sig_ptr, step_ptr, row, step_stride, next_off, sig1_idx, noise_level)
        lp = -ssq / (2.0 * std * std * N) - tl.log(std) - 0.9189385332046727  # log(2 pi) / 2
        tl.store(logp_ptr + row, lp)
        tl.store(std_ptr + row, s)

    @triton.jit
    def _bwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, gmean_ptr, gsample_ptr, gx_ptr, gv_ptr, gvc_ptr, offs, mask, z,
                  sigma, dt, s, std, glp_scale, guidance, NOISE: tl.constexpr, CFG: tl.constexpr,
                  HAS_GMEAN: tl.constexpr, HAS_GSAMPLE: tl.constexpr, NEED_GX: tl.constexpr,
                  NEED_GV: tl.constexpr):
        c = s * s / (2.0 * sigma)
        if NOISE == 2:  # d = x' - mu needs mu: recompute it from x and v
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if CFG:
                v = v + guidance * (tl.load(vc_ptr + offs, mask=mask, other=0.0).to(tl.float32) - v)
            mean = x + (v + c * (x + (1.0 - sigma) * v)) * dt
            d = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
        else:
            if NOISE == 1:
                z = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = std * z
        gmu = glp_scale * d
        if HAS_GMEAN:
            gmu += tl.load(gmean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GSAMPLE:
            gmu += tl.load(gsample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(gx_ptr + offs, ((1.0 + c * dt) * gmu).to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_GV:
            gv = dt * (1.0 + c * (1.0 - sigma)) * gmu
            if CFG:
                tl.store(gv_ptr + offs, ((1.0 - guidance) * gv).to(gv_ptr.dtype.element_ty), mask=mask)
                tl.store(gvc_ptr + offs, (guidance * gv).to(gvc_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(gv_ptr + offs, gv.to(gv_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sde_step_bwd_kernel(
        x_ptr,  # [B, N] forward x (read for NOISE=2 only)
        v_ptr,  # [B, N] forward v or v_u (NOISE=2 only)
        vc_ptr,  # [B, N] forward v_c (NOISE=2 with CFG only)
        aux_ptr,  # [B, N] eps (NOISE=1) or prev_sample (NOISE=2)
        gmean_ptr,  # [B, N] upstream grad of mu (HAS_GMEAN)
        gsample_ptr,  # [B, N] upstream grad of x' (HAS_GSAMPLE; NOISE=0/1 only)
        glp_ptr,  # [B] float32 upstream grad of log_prob (zeros when it has none)
        gx_ptr,  # [B, N] out grad of x (NEED_GX)
        gv_ptr,  # [B, N] out grad of v, or of v_u with CFG (NEED_GV)
        gvc_ptr,  # [B, N] out grad of v_c (NEED_GV with CFG)
        sig_ptr, step_ptr, seed_ptr, offset_ptr,  # as in the forward
        N, Q, step_stride, seed_stride, next_off, sig1_idx, noise_level, guidance,
        BLOCK_G: tl.constexpr, NOISE: tl.constexpr, CFG: tl.constexpr, HAS_GMEAN: tl.constexpr,
        HAS_GSAMPLE: tl.constexpr, NEED_GX: tl.constexpr, NEED_GV: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.program_id(1)
        sigma, dt, s, std = _sigma_terms(sig_ptr, step_ptr, row, step_stride, next_off, sig1_idx, noise_level)
        glp_scale = tl.load(glp_ptr + row) / (std * std * N)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < Q
        if NOISE == 0:  # regenerate the forward's noise instead of storing it
            seed = tl.load(seed_ptr + row * seed_stride)
            z0, z1, z2, z3 = philox_normal4(seed, tl.load(offset_ptr), g, row * (1 - seed_stride))
        else:
            z0 = tl.zeros([BLOCK_G], tl.float32)
            z1 = z0
            z2 = z0
            z3 = z0
        base = row.to(tl.int64) * N
        for lane in tl.static_range(4):
            z = z0 if lane == 0 else (z1 if lane == 1 else (z2 if lane == 2 else z3))
            n = lane * Q + g
            _bwd_lane(x_ptr, v_ptr, vc_ptr, aux_ptr, gmean_ptr, gsample_ptr, gx_ptr, gv_ptr, gvc_ptr, base + n,
                      gmask & (n < N), z, sigma, dt, s, std, glp_scale, guidance, NOISE, CFG, HAS_GMEAN, HAS_GSAMPLE,
                      NEED_GX, NEED_GV)


# --------------------------------------------------------------------------------------------- launchers


class _Args(NamedTuple):
    """The device-side parameters of one step, shared by forward and backward."""

    table: torch.Tensor  # float32 sigma table
    step: torch.Tensor  # int step index, 1 or B elements
    seed: torch.Tensor  # int64, 1 or B elements
    offset: torch.Tensor  # int64, 1 element
    next_off: int
    sig1_idx: int
    noise_level: float
    guidance: float
    mode: int
    cfg: bool


def _flat(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(b, -1).contiguous()


def _native_partials(q: int, b: int, elem: int, device: torch.device) -> int:
    """Blocks per row of the CUDA kernel: 256 threads x (16 B / elem) groups each, at most ~4 blocks/SM overall."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_block = 256 * (16 // elem)
    return max(1, min((q + per_block - 1) // per_block, (4 * sms) // b))


# The launches are torch custom ops, so torch.compile sees each as one opaque node with known output shapes (the
# fake impls). Not `flowopd::sde_step_fwd`: that is the C++ op of csrc/, which the `cuda` backend calls from
# inside this one. A custom op may return neither None nor an alias of an input, so absent outputs (no mu; x' =
# prev_sample, or x' written into `out`) come back as 0-element tensors that `_launch_fwd` replaces. (No argument
# may be called `mode`: torch.compile's functionalization of the mutating op passes a `mode` of its own.)
# Eager calls skip the op layer (`_launch_fwd`): its dispatch costs 94 us per call (measured, 2-core CPU machine,
# torch 2.13; an estimated ~10 us of HBM traffic is the whole bf16 step at 16x16x128x128 on an H100), and its
# first call imports torch._dynamo (2.2 s). Same function either way, so the results are the same bits.


def _sde_step_fwd(
    backend: str, x: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None, aux: torch.Tensor | None,
    table: torch.Tensor, step: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, next_off: int, sig1_idx: int,
    noise_level: float, guidance: float, noise_mode: int, return_mean: bool, out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    n = x.numel() // b
    q = noise_groups(n)
    x2, v2, vc2, aux2 = _flat(x, b), _flat(v, b), _flat(vc, b), _flat(aux, b)
    sample = None
    if noise_mode != NOISE_PREV:
        sample = out.reshape(b, n) if out is not None else _empty((b, n), x.dtype, x.device)
    mean = _empty((b, n), x.dtype, x.device) if return_mean else None
    logp = _empty((b,), torch.float32, x.device)
    std = _empty((b,), torch.float32, x.device)
    step_stride, seed_stride = int(step.numel() != 1), int(seed.numel() != 1)
    if backend == "cuda":
        p = _native_partials(q, b, x.element_size(), x.device)
        part = _empty((b, p), torch.float32, x.device)
        torch.ops.flowopd.sde_step_fwd(
            x2, v2, vc2, aux2, noise_mode, table, step, next_off, sig1_idx, seed, offset,
            float(noise_level), float(guidance), sample, mean, part, logp, std)
    else:
        p = triton.cdiv(q, _BLOCK_G)
        part = _empty((b, p), torch.float32, x.device)
        _sde_step_fwd_kernel[(p, b)](
            x2, v2, vc2 if vc2 is not None else v2, aux2 if aux2 is not None else x2,
            sample if sample is not None else x2, mean if mean is not None else x2, part,
            table, step, seed, offset, n, q, p, step_stride, seed_stride, next_off, sig1_idx,
            float(noise_level), float(guidance),
            BLOCK_G=_BLOCK_G, NOISE=noise_mode, CFG=vc is not None, WRITE_MEAN=return_mean, num_warps=4)
        _sde_logprob_kernel[(b,)](
            part, logp, std, table, step, n, p, step_stride, next_off, sig1_idx, float(noise_level),
            BLOCK_P=_BLOCK_P, num_warps=4)
    sample = x.new_empty(0) if sample is None or out is not None else sample.view(x.shape)
    return sample, x.new_empty(0) if mean is None else mean.view(x.shape), logp, std


_sde_step_fwd_op = torch.library.custom_op("flowopd::sde_step_kernel_fwd", _sde_step_fwd, mutates_args=("out",))


@_sde_step_fwd_op.register_fake
def _(backend, x, v, vc, aux, table, step, seed, offset, next_off, sig1_idx, noise_level, guidance, noise_mode,
      return_mean, out):
    b = x.shape[0]
    sample = x.new_empty(x.shape) if noise_mode != NOISE_PREV and out is None else x.new_empty(0)
    mean = x.new_empty(x.shape) if return_mean else x.new_empty(0)
    return sample, mean, x.new_empty((b,), dtype=torch.float32), x.new_empty((b,), dtype=torch.float32)


def _sde_step_bwd(
    x: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None, aux: torch.Tensor | None, table: torch.Tensor,
    step: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, next_off: int, sig1_idx: int, noise_level: float,
    guidance: float, noise_mode: int, g_sample: torch.Tensor | None, g_mean: torch.Tensor | None,
    g_logp: torch.Tensor | None, need_gx: bool, need_gv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    n = x.numel() // b
    q = noise_groups(n)
    cfg = vc is not None
    x2, v2, vc2, aux2 = _flat(x, b), _flat(v, b), _flat(vc, b), _flat(aux, b)
    gm2, gs2 = _flat(g_mean, b), _flat(g_sample, b)
    glp = g_logp.float().contiguous() if g_logp is not None else torch.zeros(b, device=x.device)
    gx = _empty((b, n), x.dtype, x.device) if need_gx else None
    gv = _empty((b, n), v.dtype, x.device) if need_gv else None
    gvc = _empty((b, n), vc.dtype, x.device) if need_gv and cfg else None
    dummy = x2
    _sde_step_bwd_kernel[(triton.cdiv(q, _BLOCK_G), b)](
        x2, v2, vc2 if vc2 is not None else dummy, aux2 if aux2 is not None else dummy,
        gm2 if gm2 is not None else dummy, gs2 if gs2 is not None else dummy, glp,
        gx if gx is not None else dummy, gv if gv is not None else dummy, gvc if gvc is not None else dummy,
        table, step, seed, offset, n, q, int(step.numel() != 1), int(seed.numel() != 1), next_off,
        sig1_idx, float(noise_level), float(guidance),
        BLOCK_G=_BLOCK_G, NOISE=noise_mode, CFG=cfg, HAS_GMEAN=gm2 is not None, HAS_GSAMPLE=gs2 is not None,
        NEED_GX=need_gx, NEED_GV=need_gv, num_warps=4)
    shape = x.shape
    return tuple(x.new_empty(0) if g is None else g.view(shape) for g in (gx, gv, gvc))


_sde_step_bwd_op = torch.library.custom_op("flowopd::sde_step_kernel_bwd", _sde_step_bwd, mutates_args=())


@_sde_step_bwd_op.register_fake
def _(x, v, vc, aux, table, step, seed, offset, next_off, sig1_idx, noise_level, guidance, noise_mode, g_sample, g_mean,
      g_logp, need_gx, need_gv):
    gx = x.new_empty(x.shape) if need_gx else x.new_empty(0)
    gv = v.new_empty(x.shape) if need_gv else x.new_empty(0)
    gvc = vc.new_empty(x.shape) if need_gv and vc is not None else x.new_empty(0)
    return gx, gv, gvc


def _nd(t: torch.Tensor | None) -> torch.Tensor | None:
    """t detached: the ops have no autograd formula (SDEStepFunction is it), so their outputs must not ask."""
    return None if t is None else t.detach()


def _launch_fwd(backend: str, x, v, vc, aux, a: _Args, return_mean: bool, out: torch.Tensor | None):
    """(x', mu or None, log_prob, std) of one forward launch; x' is out (reshaped) when given, prev_sample in
    x's dtype in re-scoring mode."""
    fwd = _sde_step_fwd_op if torch.compiler.is_compiling() else _sde_step_fwd
    sample, mean, logp, std = fwd(
        backend, _nd(x), _nd(v), _nd(vc), _nd(aux), _nd(a.table), a.step, a.seed, a.offset, a.next_off, a.sig1_idx,
        float(a.noise_level), float(a.guidance), a.mode, return_mean, out)
    if a.mode == NOISE_PREV:
        sample = aux.detach() if aux.dtype == x.dtype else aux.detach().to(x.dtype)
    elif out is not None:
        sample = out.view(x.shape)
    return sample, mean if return_mean else None, logp, std


def _launch_bwd(x, v, vc, aux, a: _Args, g_sample, g_mean, g_logp, need_gx: bool, need_gv: bool):
    """(gx, gv, gvc), None where not needed (gvc also without CFG)."""
    bwd = _sde_step_bwd_op if torch.compiler.is_compiling() else _sde_step_bwd
    gx, gv, gvc = bwd(
        _nd(x), _nd(v), _nd(vc), _nd(aux), _nd(a.table), a.step, a.seed, a.offset, a.next_off, a.sig1_idx,
        float(a.noise_level), float(a.guidance), a.mode, _nd(g_sample), _nd(g_mean), _nd(g_logp), need_gx, need_gv)
    return gx if need_gx else None, gv if need_gv else None, gvc if need_gv and a.cfg else None


# --------------------------------------------------------------------------------------------- autograd


class SDEStepFunction(torch.autograd.Function):
    """Autograd wrapper; the backward is one Triton launch (for either forward backend).

    With c = s^2 / (2 sigma), the mean is linear in x and v:  mu = alpha x + beta v,
        alpha = 1 + c dt,   beta = dt (1 + c (1 - sigma)),   v = v_u + g (v_c - v_u).
    log_prob_b = -sum_n (x'_n - mu_n)^2 / (2 std^2 N) - log std - log(2 pi)/2 with x' detached in the log-prob
    (as in the reference), so d log_prob_b / d mu_n = (x'_n - mu_n) / (std^2 N) = d_n / (std^2 N). x' itself is
    mu + std eps (no grad to eps) or the given prev_sample (no grad). Collecting every path into mu:
        G_n   = gmean_n + gsample_n [sampled x' only] + glp_b d_n / (std^2 N)
        gx_n  = alpha G_n,   gv_n = beta G_n,   gv_u = (1 - g) gv,   gv_c = g gv.
    d_n = std eps_n when x' was sampled (a given eps is saved; Philox eps is regenerated from seed/offset, nothing
    stored beyond the inputs), d_n = prev_n - mu_n with mu recomputed from x, v otherwise. Sigmas, seeds and eps
    get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, backend: str, a: _Args, return_mean: bool, x: torch.Tensor, v: torch.Tensor,
                vc: torch.Tensor | None, aux: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(x', mu, log_prob, s) of the fused step (see the module docstring)."""
        sample, mean, logp, std = _launch_fwd(backend, x, v, vc, aux, a, return_mean, None)
        ctx.a = a
        ctx.save_for_backward(x, v, vc, aux)
        if a.mode == NOISE_PREV:
            ctx.mark_non_differentiable(sample)
        ctx.mark_non_differentiable(std)
        return sample, mean, logp, std

    @staticmethod
    def backward(ctx: Any, g_sample: torch.Tensor | None, g_mean: torch.Tensor | None, g_logp: torch.Tensor | None,
                 _g_std: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Gradients into x, v (or the CFG pair) and a given prev_sample's path, one Triton backward launch."""
        x, v, vc, aux = ctx.saved_tensors
        a: _Args = ctx.a
        need_gx = ctx.needs_input_grad[3]
        need_gv = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        if a.mode == NOISE_PREV:
            g_sample = None
        gx, gv, gvc = _launch_bwd(x, v, vc, aux, a, g_sample, g_mean, g_logp, need_gx, need_gv)
        return None, None, None, gx, gv, gvc, None


# --------------------------------------------------------------------------------------------- public


def _int64_scalar(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int64 device tensor; ints go through torch.full (a fill kernel: capturable, no host->device copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(-1)
    v = int(value) & ((1 << 64) - 1)
    return torch.full((1,), v - (1 << 64) if v >= 1 << 63 else v, dtype=torch.int64, device=device)


def _check(x: torch.Tensor, *others: torch.Tensor | None) -> None:
    if x.ndim < 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be [B, ...] float32/bfloat16/float16, got {tuple(x.shape)} {x.dtype}")
    for t in others:
        if t is not None and (t.shape != x.shape or t.device != x.device or t.dtype not in _FLOATS):
            raise ValueError(f"inputs must match x {tuple(x.shape)} on {x.device}, got {tuple(t.shape)} {t.dtype}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")


def _run(backend: str, x, v, v_uncond, v_cond, noise, prev_sample, a: _Args, return_mean: bool, out):
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    vv, vc = (v_uncond, v_cond) if a.cfg else (v, None)
    if vv is None or (a.cfg and vc is None):
        raise ValueError("give v, or both v_uncond and v_cond")
    aux = prev_sample if a.mode == NOISE_PREV else noise
    _check(x, vv, vc, aux)
    if noise is not None and noise.requires_grad:
        raise ValueError("the fused step gives no gradient to noise; use the reference")
    if out is not None:
        _check_out(out, x)
        if a.mode == NOISE_PREV:
            raise ValueError("out= receives a sampled x'; with prev_sample there is nothing to write")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, vv, vc))
    if not grads:
        sample, mean, logp, std = _launch_fwd(backend, x, vv, vc, aux, a, return_mean, out)
    else:
        if out is not None:
            raise ValueError("out= is for no-grad rollouts; it cannot be combined with autograd")
        sample, mean, logp, std = SDEStepFunction.apply(backend, a, return_mean, x, vv, vc,
                                                        None if aux is None else aux.detach())
    return SDEStepResult(sample, mean, logp, std)


def sde_step_indexed(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
    return_mean: bool = True,
    out: torch.Tensor | None = None,
    backend: str = "triton",
) -> SDEStepResult:
    """The graph-capturable step: sigma = sigmas[step], sigma_next = sigmas[step + 1], sigma_1 = sigmas[1].

    x [B, ...] (contiguous float32/bf16/fp16); v, or v_uncond + v_cond + guidance (CFG fused); sigmas float32
    [S+1] on x's device; step int32/int64 on x's device, 1 element (shared) or [B]. Noise: `prev_sample`
    (re-score a stored transition), else `noise`, else Philox from `seed` (int or int64 tensor of 1 or B
    elements) and `offset` (int or 1-element int64 tensor). `out` (no-grad only) receives x' and may be x itself.
    """
    cfg = v is None
    mode = NOISE_PREV if prev_sample is not None else (NOISE_GIVEN if noise is not None else NOISE_PHILOX)
    if sigmas.dtype != torch.float32 or sigmas.device != x.device:
        raise ValueError(f"sigmas must be float32 on {x.device}, got {sigmas.dtype} on {sigmas.device}")
    if step.device != x.device or step.numel() not in (1, x.shape[0]) or step.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step must be int32/int64 on {x.device} with 1 or {x.shape[0]} elements")
    a = _Args(sigmas, step.reshape(-1), _int64_scalar(seed, x.device), _int64_scalar(offset, x.device)[:1], 1, 1,
              float(noise_level), float(guidance), mode, cfg)
    if a.seed.numel() not in (1, x.shape[0]):
        raise ValueError(f"seed must have 1 or {x.shape[0]} elements")
    if backend == "cuda":  # the C++ op takes int64 steps only
        a = a._replace(step=a.step.to(torch.int64))
    return _run(backend, x, v, v_uncond, v_cond, noise, prev_sample, a, return_mean, out)


def _per_row(value: float | torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, b):
            raise ValueError(f"sigma must be a scalar or shape [{b}], got {tuple(value.shape)}")
        return t.expand(b)
    return torch.full((b,), float(value), dtype=torch.float32, device=device)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sigma_1: float | torch.Tensor,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    return_mean: bool = True,
    backend: str = "triton",
) -> SDEStepResult:
    """Same arguments as `engine.ops.sde_step_ref` (per-row sigmas as floats or [B] tensors).

    Builds the table [sigma (B), sigma_next (B), sigma_1] and steps arange(B). Without noise and prev_sample the
    noise is Philox keyed by a seed drawn from `generator` (or torch's default generator of x's device): the
    same distribution as the reference's torch.randn, a different stream.
    """
    b, dev = x.shape[0], x.device
    table = torch.cat([_per_row(sigma, b, dev), _per_row(sigma_next, b, dev), _per_row(sigma_1, 1, dev)])
    mode = NOISE_PREV if prev_sample is not None else (NOISE_GIVEN if noise is not None else NOISE_PHILOX)
    seed = torch.zeros(1, dtype=torch.int64, device=dev)
    if mode == NOISE_PHILOX:
        gen_dev = generator.device if generator is not None else dev
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=generator, device=gen_dev, dtype=torch.int64)
        seed = seed.to(dev)
    a = _Args(table, torch.arange(b, device=dev), seed, torch.zeros(1, dtype=torch.int64, device=dev), b, 2 * b,
              float(noise_level), float(guidance), mode, v is None)
    return _run(backend, x, v, v_uncond, v_cond, noise, prev_sample, a, return_mean, None)
