"""Host -> device transfers of the hot path without host syncs.

On CUDA, `torch.tensor(list, device=cuda)` and `cpu_tensor.to(cuda)` copy from pageable memory and block the host
until the stream reaches the copy, which empties the launch queue once per call (issue 18 counted ~25 per step from
segment metadata, gather indices and the trainer). Two remedies:
- `device_ints`: small integer lists that repeat every step (segment bounds and adapter slots of a row plan, gather
  indices of a few runs) are copied once per (values, device, dtype) and the device tensor is reused, read-only;
- `to_device`: data that changes every step (query indices, prompt embeddings) goes through pinned memory with a
  non-blocking copy (the caching host allocator keeps the pinned block until the copy has run).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_CACHED = 512  # distinct integer lists kept: a run's row plans and index lists are tens (routes x fields)
_INTS: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def device_ints(values: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A device tensor holding `values`, copied once per (values, device, dtype) and then reused: never write to it."""
    device = torch.device(device)
    key = (device, dtype, tuple(int(v) for v in values))
    hit = _INTS.get(key)
    if hit is not None:
        _INTS.move_to_end(key)
        return hit
    t = to_device(torch.tensor(key[2], dtype=dtype), device)
    _INTS[key] = t
    if len(_INTS) > MAX_CACHED:
        _INTS.popitem(last=False)
    return t


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a CPU -> CUDA copy goes through pinned memory and does not block the host."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
