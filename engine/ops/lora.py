"""Op `lora_segmented`: the segmented multi-LoRA linear of kernels/lora_segmented.py (docs/multi_lora.md).

Reference (`torch`): `lora_segmented_torch`, the batched gather + bmm fallback; `triton`: the SGMV-style shrink /
expand kernels. That `auto` runs Triton only on a GPU (the CPU interpreter is an emulator, far slower than the
bmm fallback) is the table's availability rule; ask for the interpreter with FLOWOPD_BACKEND_LORA_SEGMENTED=triton.
The kernel module is imported on first call.
"""

from __future__ import annotations

import torch

from engine.ops.registry import Impl, Op, register, resolve
from kernels.runtime import triton_runs_on


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
    """`kernels.lora_segmented.lora_segmented_torch` (batched gather + bmm; no host sync)."""
    from kernels.lora_segmented import lora_segmented_torch as gather_bmm

    return gather_bmm(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter, trainable)


def _lora_segmented_triton(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter, trainable=None):
    from kernels.lora_segmented import lora_segmented as fused

    return fused(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter, trainable)


def _lora_segmented_triton_takes(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter,
                                 trainable=None) -> bool:
    return isinstance(x, torch.Tensor) and triton_runs_on(x)


register(Op("lora_segmented", lora_segmented_torch,
            {"triton": Impl(_lora_segmented_triton, _lora_segmented_triton_takes)}))


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
    """y = x W^T + bias + s_i (x A_i^T) B_i^T per segment; weight grads only for slot `trainable` (None = all)."""
    return resolve("lora_segmented")(x, weight, bias, lora_a, lora_b, scales, seg_indptr, seg_adapter, trainable)
