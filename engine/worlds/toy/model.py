"""The toy world's transformer, shipped weights and the flow-matching objective used to train them.

Shipped under `engine/toy/weights/` by `scripts/train_toy_world.py`:
  base/      diffusers `SD3Transformer2DModel` dir (config.json + diffusion_pytorch_model.safetensors)
  encoder/   `ToyTextEncoder` (config.json + model.safetensors)
  experts/<task>/  PEFT adapter dirs (adapter_config.json + adapter_model.safetensors, and the diffusers
             pytorch_lora_weights.safetensors) written by `engine.models.export.export_adapter`
  eval.json  the recorded eval rows (tests reproduce them)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from engine.adapters.lora import load_adapter
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.worlds.toy.encoder import ToyTextEncoder
from engine.worlds.toy.world import CHANNELS, IMAGE_SIZE, TASKS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# 0.6 M parameters; 64 image tokens (16x16 / patch 2) + 12 text tokens. A training step of batch 64 takes
# ~0.15 s on 2 CPU cores, a no-grad forward of batch 64 ~35 ms. Layer 0 has the dual (image-only)
# attention and qk RMSNorm, as in SD3.5-Medium.
TOY_TRANSFORMER: dict = dict(
    sample_size=IMAGE_SIZE,
    patch_size=2,
    in_channels=CHANNELS,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    out_channels=CHANNELS,
    pos_embed_max_size=IMAGE_SIZE // 2,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
EXPERTS: dict[str, str] = {task: task for task in TASKS}
"""Expert adapter name per task (the task tag routes a prompt to its expert)."""


def new_transformer(seed: int) -> SD3Transformer2DModel:
    """A randomly initialised toy transformer (global RNG seeded with `seed`)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TOY_TRANSFORMER)


def load_toy(
    weights_dir: str | Path = WEIGHTS_DIR, experts: bool = True
) -> tuple[SD3Transformer2DModel, ToyTextEncoder]:
    """The shipped base (frozen, eval mode) with the expert adapters loaded under `EXPERTS` names, and the encoder."""
    from engine.backends.sd3.loading import load_transformer

    weights_dir = Path(weights_dir)
    model = load_transformer(weights_dir / "base", torch.float32).eval()  # strict: SHA256SUMS, missing keys, NaN
    if experts:
        for task, name in EXPERTS.items():
            load_adapter(model, name, weights_dir / "experts" / task)
    model.requires_grad_(False)  # peft's add_adapter makes the new LoRA weights trainable
    return model, ToyTextEncoder.from_pretrained(weights_dir / "encoder")


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's training noise levels: sigma = sigmoid(N(mean, std))."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(
    model: torch.nn.Module, x0: torch.Tensor, cond: SD3Cond, generator: torch.Generator
) -> torch.Tensor:
    """Rectified-flow loss: x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, timestep = 1000 sigma."""
    sigma = logit_normal_sigmas(x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    v = predict_velocity(model, x, sigma, cond)
    return torch.nn.functional.mse_loss(v.float(), eps - x0)
