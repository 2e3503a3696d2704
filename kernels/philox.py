"""The counter-based Gaussian noise stream shared by the Triton kernels, the CUDA C++ kernels and the reference.

Contract ("flowopd noise v1"; `csrc/sde_step_kernels.cu` implements the same):
- A tensor [B, *rest] is viewed per row as N = prod(rest) elements; elements are split into 4 lanes of
  Q = 16 * ceil(N / 64) (a multiple of 16, 4 Q >= N): element n of row b is lane n // Q, group g = n % Q.
- Philox4x32-10 (Salmon et al. 2011, Random123 constants, the generator of curand and torch) with
  key (k0, k1) = (low, high 32 bits of the seed) and counter (c0, c1, c2, c3) = (g, r, low, high 32 bits of
  the offset), where r = b if one seed is shared by the batch and r = 0 with one seed per row (the row's seed
  already separates rows, so a row's noise does not depend on its position in the batch).
- Its four outputs r0..r3 become uniforms u_i = (r_i >> 9) 2^-23 + 2^-24, exact in float32 and strictly inside
  (0, 1) (log u never sees 0), then two Box-Muller pairs:
      lane 0 = sqrt(-2 ln u0) cos(2 pi u1)   lane 1 = sqrt(-2 ln u0) sin(2 pi u1)
      lane 2 = sqrt(-2 ln u2) cos(2 pi u3)   lane 3 = sqrt(-2 ln u2) sin(2 pi u3)
  |z| <= sqrt(2 ln 2^24) = 5.77 (a tail of probability 8e-9 is cut).
The integer stream and the uniforms are bit-identical everywhere; the normals agree to float32 transcendental
rounding (~1e-6 relative). The lane split (rather than 4 adjacent elements per counter) keeps every load and
store of the kernels a plain contiguous 1-D block while one Philox call still feeds four elements.
"""

from __future__ import annotations

import math

import torch

from kernels.runtime import triton_importable

HAS_TRITON = triton_importable()  # kept for importers of this name; kernels/runtime.py holds the rule
if HAS_TRITON:
    import triton
    import triton.language as tl

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def noise_groups(n: int) -> int:
    """Q, the lane length of a row of n elements (a multiple of 16 so every lane start stays 16-byte aligned)."""
    return 16 * ((n + 63) // 64)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64 (split so no int64 product overflows)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_lo = a_lo * m
    t = a_hi * m + (t_lo >> 16)  # < 2^48 + 2^32
    return t >> 16, ((t & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox4x32_10_ref(
    c: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (any device; broadcasting)."""
    c0, c1, c2, c3 = c
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _as_int64(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(-1)
    v = int(value) & ((1 << 64) - 1)
    return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v], dtype=torch.int64, device=device)


def philox_normal_ref(
    seed: int | torch.Tensor,
    offset: int | torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The noise of the contract above for a tensor of `shape` [B, ...] (float64 Box-Muller by default).

    `seed` is an int or an int64 tensor of 1 or B elements (one per row); `offset` an int or a 1-element tensor.
    """
    device = torch.device(device)
    b, n = shape[0], math.prod(shape[1:])
    q = noise_groups(n)
    seeds = _as_int64(seed, device)
    if seeds.numel() not in (1, b):
        raise ValueError(f"seed must have 1 or {b} elements, got {seeds.numel()}")
    off = _as_int64(offset, device)[:1]
    per_row = seeds.numel() == b and b != 1
    k = seeds.reshape(-1, 1)
    g = torch.arange(q, device=device, dtype=torch.int64).reshape(1, q)
    rows = torch.arange(b, device=device, dtype=torch.int64).reshape(b, 1)
    c = (
        g.expand(b, q),
        (rows * 0 if per_row else rows).expand(b, q),
        (off & _MASK32).expand(b, q),
        ((off >> 32) & _MASK32).expand(b, q),
    )
    r = philox4x32_10_ref(c, k & _MASK32, (k >> 32) & _MASK32)
    u = [(ri >> 9).to(torch.float64) * 2.0**-23 + 2.0**-24 for ri in r]
    rad01, rad23 = torch.sqrt(-2 * torch.log(u[0])), torch.sqrt(-2 * torch.log(u[2]))
    th01, th23 = 2 * math.pi * u[1], 2 * math.pi * u[3]
    lanes = torch.stack([rad01 * torch.cos(th01), rad01 * torch.sin(th01), rad23 * torch.cos(th23),
                         rad23 * torch.sin(th23)], dim=1)  # [B, 4, Q]: element n = lane * Q + g
    return lanes.reshape(b, 4 * q)[:, :n].reshape(shape).to(dtype)


if HAS_TRITON:

    @triton.jit
    def philox_normal4(seed, offset, g, row):
        """Four normal blocks (lanes 0..3) for the group indices `g` of one row.

        seed, offset: int64 scalars (key; counter words 2-3); g: block of group indices; row: counter word 1.
        """
        c0 = g.to(tl.uint32)
        zero = c0 * 0
        off = offset.to(tl.uint64)
        c1 = zero + row.to(tl.uint32)
        c2 = zero + off.to(tl.uint32)
        c3 = zero + (off >> 32).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        # (r >> 9) 2^-23 + 2^-24 is exact in float32: the same uniforms as the reference and the CUDA kernel
        u0 = (r0 >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
        u1 = (r1 >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
        u2 = (r2 >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
        u3 = (r3 >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
        rad01 = tl.sqrt(-2.0 * tl.log(u0))
        rad23 = tl.sqrt(-2.0 * tl.log(u2))
        th01 = 6.283185307179586 * u1
        th23 = 6.283185307179586 * u3
        return rad01 * tl.cos(th01), rad01 * tl.sin(th01), rad23 * tl.cos(th23), rad23 * tl.sin(th23)
