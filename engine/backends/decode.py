"""Latents -> images in [0, 1] for scorers and grids: the model family's VAE (`ModelBackend.vae`), or the identity
for a pixel-space model (3 latent channels, no VAE: the miniature worlds, whose latents in [-1, 1] are the image)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.backends.base import ModelBackend

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""latents [B, ...] -> images [B, 3, H, W] in [0, 1] (float32, CPU)."""


def make_decoder(backend: ModelBackend, model_dir: Path | None, latent_shape: Sequence[int],
                 device: torch.device) -> Decoder:
    """The decoder of a model: its family's VAE from `model_dir` on `device`, or the identity for a pixel-space
    model (3 latent channels, no VAE); ValueError naming the dir otherwise."""
    vae = backend.vae(model_dir)
    if vae is not None:
        vae.to(device)
        return lambda z: ((vae.decode(z).float().cpu() + 1) / 2).clamp(0, 1)
    if latent_shape[0] == 3:
        return lambda z: ((z.float().cpu() + 1) / 2).clamp(0, 1)
    where = f"{model_dir} has no VAE" if model_dir is not None else "a preset model has no VAE"
    raise ValueError(f"images need the model family's VAE to decode {latent_shape[0]}-channel latents, but {where}: "
                     f"set model.path to a local {backend.family} pipeline dir with vae/")
