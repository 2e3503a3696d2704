"""Deterministic sampling for evaluation: fixed per-sample noise, the Euler ODE, decoding to images.

Sample j of prompt i under seed s always starts from the noise of `engine.rng.generator(EVAL, s, i, j)`, whatever
the batching, so a validation grid changes only when the model does and `python -m engine.eval` is reproducible.
Latents are decoded by the model family's VAE (`ModelBackend.vae`); a model without a VAE whose latents have 3
channels is a pixel-space model (the miniature worlds): its latents in [-1, 1] are the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from engine.backends.base import TensorCond
from engine.backends.decode import Decoder
from engine.ops import ode_step
from engine.rng import EVAL, generator
from engine.sampling.schedule import flow_match_sigmas

Velocity = Callable[[torch.Tensor, torch.Tensor, TensorCond], torch.Tensor]
"""(x [B, ...], sigma [B], cond) -> velocity, with whatever adapter and guidance the caller applies."""


def eval_noise(n_prompts: int, seeds: Sequence[int], samples: int, shape: Sequence[int]) -> torch.Tensor:
    """[n_prompts * len(seeds) * samples, *shape] noise, prompt-major, then seed, then sample."""
    out = torch.empty(n_prompts * len(seeds) * samples, *shape)
    k = 0
    for i in range(n_prompts):
        for s in seeds:
            for j in range(samples):
                out[k] = torch.randn(tuple(shape), generator=generator(EVAL, s, i, j))
                k += 1
    return out


@torch.no_grad()
def ode_sample(velocity: Velocity, noise: torch.Tensor, cond: TensorCond, steps: int, shift: float) -> torch.Tensor:
    """Euler ODE from `noise` (sigma 1) to sigma 0 on the schedule of FlowMatchEulerDiscreteScheduler(shift)."""
    sigmas = flow_match_sigmas(steps, shift).to(noise.device)
    x = noise.float().clone()
    for i in range(steps):
        v = velocity(x, sigmas[i].expand(x.shape[0]), cond)
        x = ode_step(x, v.float(), sigmas[i], sigmas[i + 1])
    return x


def sample_images(velocity: Velocity, cond: TensorCond, noise: torch.Tensor, decode: Decoder, steps: int,
                  shift: float, batch: int, device: torch.device) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] (CPU) of `noise` [N, ...] under `cond` (N rows), `batch` rows at a time."""
    out = []
    for s in range(0, noise.shape[0], batch):
        z = ode_sample(velocity, noise[s:s + batch].to(device), cond[s:s + batch].to(device), steps, shift)
        out.append(decode(z))
    return torch.cat(out)


def grid(images: torch.Tensor, rows: int, pad: int = 2) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> an HWC uint8 grid of `rows` rows (row-major: row r holds images r*cols...)."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[k]
    return canvas


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> Path:
    """Write an HWC uint8 image as PNG (nearest-neighbour upscaled by `scale`) via a temp file and a rename."""
    import os

    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
