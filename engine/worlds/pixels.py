"""Pixel helpers the miniature worlds' analytic rewards share (pure numpy on [B, 3, H, W] images)."""

from __future__ import annotations

import numpy as np
import torch


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
