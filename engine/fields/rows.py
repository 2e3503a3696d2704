"""The ONE layout of field rows: which forward rows evaluate which query rows, under which adapter, and which are
the unconditional twins of classifier-free guidance.

Every evaluator (peft switch, segmented batch) and the CUDA-graph rollout build their forward batch from a
`RowPlan`, so the `[uncond; cond]` convention exists once: forward rows are grouped by adapter slot (one segment
per adapter, slots nondecreasing); inside a slot the unconditional twins of the guided query rows come first, then
the conditional rows, each in query order. For one field on n rows that is `[uncond(n); cond(n)]`. A twin's
conditioning is `cond.uncond_twin(uncond)` (the backend's rule: SD3 drops the whole row's prompt, an edit keeps its
source image). Gathers are slices and concatenations of contiguous runs where possible (no host-to-device index
copy: the plans of one field, or of rows sorted by field, are a few runs); other index lists are copied to the
device once and reused (`engine.transfer.device_ints`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from engine.backends.base import TensorCond
from engine.fields.field import Field, get_operator
from engine.transfer import device_ints

T = TypeVar("T", torch.Tensor, TensorCond)
MAX_RUNS = 8  # more runs than this: one index gather beats many slices + a cat


def _runs(idx: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values in `idx`."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def take(t: T, idx: Sequence[int]) -> T:
    """Rows `idx` of a tensor or a TensorCond: a view for one run, a cat of slices for a few, else a gather."""
    runs = _runs(idx)
    if len(runs) == 1:
        a, b = runs[0]
        return t[a:b]
    if len(runs) <= MAX_RUNS:
        parts = [t[a:b] for a, b in runs]
        return type(t).cat(parts) if isinstance(t, TensorCond) else torch.cat(parts)
    device = next(iter(t.tensors().values())).device if isinstance(t, TensorCond) else t.device
    return t[device_ints(idx, device)]


@dataclass(frozen=True)
class RowPlan:
    """Forward rows of one evaluation: source query row, twin flag and adapter slot of each."""

    src: list[int]
    """forward row -> query row"""
    uncond: list[bool]
    """forward row is an unconditional twin"""
    slots: list[int]
    """forward row -> adapter slot (-1 = base); nondecreasing, so the segments are one per adapter"""
    cond_pos: dict[int, int]
    """query row -> its conditional forward row"""
    uncond_pos: dict[int, int]
    """query row -> its unconditional forward row (guided fields only)"""

    def __len__(self) -> int:
        return len(self.src)

    def _blocks(self) -> list[tuple[bool, list[int]]]:
        """Maximal runs of forward rows with the same twin flag: (twin, their query rows)."""
        blocks: list[tuple[bool, list[int]]] = []
        for s, u in zip(self.src, self.uncond):
            if blocks and blocks[-1][0] == u:
                blocks[-1][1].append(s)
            else:
                blocks.append((u, [s]))
        return blocks

    def conds(self, cond: TensorCond, uncond: TensorCond) -> TensorCond:
        """The forward batch's conditioning from the query rows' `cond`; `uncond` is the empty prompt's (batch 1)."""
        parts = []
        for twin, rows in self._blocks():
            c = take(cond, rows)
            parts.append(c.uncond_twin(uncond.to(next(iter(c.tensors().values())).device)) if twin else c)
        return parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)

    def inputs(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond,
               uncond: TensorCond) -> tuple[torch.Tensor, torch.Tensor, TensorCond]:
        """The forward batch (x, sigma, conditioning) of the query rows `x`, `sigma` [B], `cond`."""
        return take(x, self.src), take(sigma, self.src), self.conds(cond, uncond)

    def split(self, v: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(unconditional, conditional) forward outputs of query rows `rows`, in their order (None: unguided)."""
        vc = take(v, [self.cond_pos[i] for i in rows])
        if rows[0] not in self.uncond_pos:
            return None, vc
        return take(v, [self.uncond_pos[i] for i in rows]), vc

    def combine(self, v: torch.Tensor, fields: Sequence[Field]) -> list[tuple[list[int], torch.Tensor]]:
        """Each planned query row's field velocity from the forward outputs `v`, grouped by field (first-seen
        order): [(query rows, velocities)], CFG applied per guided field."""
        order = sorted(self.cond_pos)
        out = []
        for name in dict.fromkeys(fields[i].name for i in order):
            idx = [i for i in order if fields[i].name == name]
            f = fields[idx[0]]
            vu, vc = self.split(v, idx)
            out.append((idx, vc if vu is None else get_operator(f.operator)(vu, vc, f.cfg_scale)))
        return out


def plan_rows(fields: Sequence[Field], rows: Sequence[int] | None = None,
              slot: Callable[[str | None], int] = lambda adapter: 0) -> RowPlan:
    """The plan for query rows `rows` (default: all) where row i is evaluated under `fields[i]`; `slot` maps an
    adapter name (None = base) to its segment order (default: everything in one segment)."""
    entries = []
    for i in range(len(fields)) if rows is None else rows:
        s = slot(fields[i].adapter)
        if fields[i].guided:
            entries.append((s, 0, i))
        entries.append((s, 1, i))
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: query order inside (slot, twin first)
    cond_pos: dict[int, int] = {}
    uncond_pos: dict[int, int] = {}
    for pos, (_, is_cond, i) in enumerate(entries):
        (cond_pos if is_cond else uncond_pos)[i] = pos
    return RowPlan(src=[e[2] for e in entries], uncond=[e[1] == 0 for e in entries], slots=[e[0] for e in entries],
                   cond_pos=cond_pos, uncond_pos=uncond_pos)
