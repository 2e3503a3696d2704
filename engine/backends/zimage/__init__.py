"""The Z-Image family (`model.family = "zimage"`): ZImageTransformer2DModel with text-to-image and edit rows.

- `backend.ZImageBackend`: the ModelBackend (presets, strict local load, velocity, encoders, VAE, attention,
  FLOPs, LoRA files) plus `sigmas(steps)` (Z-Image's schedule) and `source_encoder(path)` (edit rows' images);
- `cond.ZImageCond`: fixed-shape conditioning of T2I and edit rows; `uncond_twin` keeps an edit row's image;
- `forward.zimage_velocity`: rows -> diffusers' per-sample lists -> the engine's velocity convention;
- `encoders`: the pipeline's Qwen prompt encoder, the builtin hash encoder, the VAE, the SigLIP source encoder;
- `presets`: `zimage-tiny`, `zimage-turbo` (the released config), `zimage-omni` (+ SigLIP), DanceOPD's LoRA targets.
"""

from __future__ import annotations

from engine.backends import register_backend
from engine.backends.zimage.backend import ZImageBackend
from engine.backends.zimage.cond import ZImageCond

__all__ = ["ZImageBackend", "ZImageCond"]

register_backend(ZImageBackend())
