"""Pixel helpers the miniature worlds' analytic rewards share (pure numpy on [B, 3, H, W] images)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Degradation(Protocol):
    """What `degrade` reads of a world's Imperfection."""

    noise_std: float
    wash: float


def as_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """`images` as a float64 numpy [B, 3, H, W] array; anything of another shape is a ValueError."""
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float64).numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {images.shape}")
    return images


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean [H, W] mask, each as an [n, 2] array of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pix))
    return out


DEGRADATIONS: tuple[str, ...] = ("noise", "blur", "wash")


def degrade(img: np.ndarray, rng: np.random.Generator, imp: Degradation | None = None,
            kind: str | None = None) -> np.ndarray:
    """One degradation of a [3, H, W] `img` in [-1, 1] (uniform over DEGRADATIONS unless `kind`), clipped to
    [-1, 1]: gaussian noise of std `imp.noise_std`, a 3x3 box blur, or colours scaled by `imp.wash` (both worlds'
    Imperfection: 0.3 and 0.5, the defaults)."""
    noise_std, wash = (0.3, 0.5) if imp is None else (imp.noise_std, imp.wash)
    kind = DEGRADATIONS[rng.integers(len(DEGRADATIONS))] if kind is None else kind
    if kind == "noise":
        out = img + noise_std * rng.standard_normal(img.shape).astype(np.float32)
    elif kind == "blur":
        h, w = img.shape[-2:]
        pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = sum(pad[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    elif kind == "wash":
        out = img * wash
    else:
        raise ValueError(f"unknown degradation {kind!r}; valid: {DEGRADATIONS}")
    return np.clip(out, -1.0, 1.0).astype(np.float32)
