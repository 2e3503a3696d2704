"""Prompt conditioning and the velocity call of an SD3 transformer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling.schedule import sigma_to_timestep


@dataclass
class Cond:
    """Prompt conditioning of a batch: the embedding sequence and the pooled embedding."""

    prompt_embeds: torch.Tensor
    """[B, L, joint_attention_dim]"""
    pooled: torch.Tensor
    """[B, pooled_projection_dim]"""

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice | Sequence[int]) -> Cond:
        return Cond(self.prompt_embeds[idx], self.pooled[idx])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        return Cond(self.prompt_embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype))

    def expand(self, batch: int) -> Cond:
        """A batch-1 conditioning repeated `batch` times (the unconditional prompt)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 Cond, got batch {len(self)}")
        return Cond(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        return Cond(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds]))


def predict_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
    """v(x, sigma | cond) of the transformer with whatever adapter is active; sigma is [B] (or scalar)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    dtype = next(model.parameters()).dtype
    out = model(
        hidden_states=x.to(dtype),
        encoder_hidden_states=cond.prompt_embeds.to(dtype),
        pooled_projections=cond.pooled.to(dtype),
        timestep=sigma_to_timestep(sigma).to(dtype),
        return_dict=False,
    )[0]
    return out
