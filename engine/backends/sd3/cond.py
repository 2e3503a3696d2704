"""SD3's conditioning of a batch: the prompt embedding sequence and the pooled embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.backends.base import TensorCond


@dataclass(frozen=True)
class SD3Cond(TensorCond):
    """CLIP-L + CLIP-G + T5 prompt conditioning (or a stand-in encoder's): what `SD3Transformer2DModel` takes."""

    prompt_embeds: torch.Tensor
    """[B, L, joint_attention_dim] (SD3.5: 77 CLIP + 256 T5 tokens, 4096 wide)."""
    pooled: torch.Tensor
    """[B, pooled_projection_dim] (SD3.5: 2048)."""
