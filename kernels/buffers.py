"""Output and scratch buffers of the kernels: `torch.empty`, NaN-poisoned under FLOWOPD_POISON=1.

The tests set FLOWOPD_POISON=1 so that an element a kernel should write but skips (a wrong mask, a missing
program) shows as NaN instead of passing with whatever the allocator left there (often an earlier, correct
result of the same shape). One env read per buffer; off by default.
"""

from __future__ import annotations

import os

import torch


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`torch.empty(shape)`; filled with NaN (floats) or -1 (integers) when FLOWOPD_POISON=1."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FLOWOPD_POISON") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
