"""Small builders shared by tests (tiny SD3 model with adapters, random inputs)."""

from __future__ import annotations

import torch

from engine.adapters.lora import STUDENT, LoraSpec, add_adapter, freeze_for_training, random_adapter
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.loading import build_preset
from engine.backends.sd3.presets import PRESETS

TINY = PRESETS["tiny"]


def tiny_model(teachers: int = 2, rank: int = 4, seed: int = 0) -> torch.nn.Module:
    model = build_preset("tiny", seed=seed)
    add_adapter(model, STUDENT, LoraSpec(rank, 2.0 * rank))
    for i in range(teachers):
        random_adapter(model, f"t{i}", LoraSpec(rank + i, float(rank)), seed=100 + i)
    freeze_for_training(model)
    return model


def randomize_student(model: torch.nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{STUDENT}" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def tiny_inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, SD3Cond]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, TINY.latent_channels, TINY.latent_size, TINY.latent_size, generator=gen)
    sigma = torch.rand(b, generator=gen)
    cond = SD3Cond(torch.randn(b, TINY.text_seq_len, TINY.joint_attention_dim, generator=gen),
                torch.randn(b, TINY.pooled_projection_dim, generator=gen))
    return x, sigma, cond
