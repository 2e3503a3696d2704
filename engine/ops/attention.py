"""Op `qk_rmsnorm`: MMDiT joint attention's per-head QK RMSNorm into the joint [B, S, H, D] layout.

Both backends are `kernels.qk_rmsnorm.joint_qk_rmsnorm` (docs/attention.md): `torch` runs its PyTorch twin of the
kernel (same rounding as diffusers), `triton` the kernel. The kernel module is imported on first call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.ops.registry import Impl, Op, register, resolve
from kernels.runtime import triton_runs_on


def qk_rmsnorm_torch(
    ys: Sequence[torch.Tensor],
    q_weights: Sequence[torch.Tensor | None],
    k_weights: Sequence[torch.Tensor | None],
    norm_q: Sequence[bool],
    norm_k: Sequence[bool],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`joint_qk_rmsnorm(..., use_triton=False)`: the PyTorch implementation of the kernel's math."""
    from kernels.qk_rmsnorm import joint_qk_rmsnorm

    return joint_qk_rmsnorm(ys, q_weights, k_weights, norm_q, norm_k, heads, eps, use_triton=False)


def _qk_rmsnorm_triton(ys, q_weights, k_weights, norm_q, norm_k, heads, eps):
    from kernels.qk_rmsnorm import joint_qk_rmsnorm

    return joint_qk_rmsnorm(ys, q_weights, k_weights, norm_q, norm_k, heads, eps, use_triton=True)


def _qk_rmsnorm_triton_takes(ys, q_weights, k_weights, norm_q, norm_k, heads, eps) -> bool:
    return len(ys) > 0 and isinstance(ys[0], torch.Tensor) and triton_runs_on(ys[0])


register(Op("qk_rmsnorm", qk_rmsnorm_torch, {"triton": Impl(_qk_rmsnorm_triton, _qk_rmsnorm_triton_takes)}))


def qk_rmsnorm(
    ys: Sequence[torch.Tensor],
    q_weights: Sequence[torch.Tensor | None],
    k_weights: Sequence[torch.Tensor | None],
    norm_q: Sequence[bool],
    norm_k: Sequence[bool],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint q, k, v [B, sum S_i, H, D] from per-stream fused projections [B, S_i, 3*H*D], q/k RMS-normalised."""
    return resolve("qk_rmsnorm")(ys, q_weights, k_weights, norm_q, norm_k, heads, eps)
