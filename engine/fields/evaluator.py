"""Field evaluation: each query row's velocity under the field it is routed to.

`FieldEvaluator` is the protocol the trainer, the objective, the rollouts and eval use; `PeftFieldEvaluator` is the
reference: one forward per field, peft adapters switched in turn, CFG rows laid out by the row plan (engine/fields/
rows.py). The segmented multi-LoRA evaluator (engine/fields/batched.py) evaluates every field in one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Protocol

import torch

from engine.adapters.lora import AdapterSwitch
from engine.backends.base import TensorCond
from engine.fields.field import Field
from engine.fields.rows import MAX_RUNS, _runs, plan_rows, take
from engine.profiling import nvtx_range
from engine.transfer import device_ints

Velocity = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, TensorCond], torch.Tensor]
"""The model family's v(model, x, sigma, cond) (`ModelBackend.velocity`)."""


class FieldEvaluator(Protocol):
    """Velocities of named fields on batches of query rows."""

    switch: AdapterSwitch

    def field(self, name: str) -> Field:
        """The field called `name`; KeyError listing the defined ones."""
        ...

    def field_velocity(self, field: Field, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond) -> torch.Tensor:
        """Velocity of one field on all rows of `x` (grad flows if enabled and the adapter is trainable)."""
        ...

    def velocities(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond, rows: Sequence[str]) -> torch.Tensor:
        """Each row's velocity under the field named in `rows[i]`; sigma is [B]."""
        ...


class PeftFieldEvaluator:
    """Reference evaluation of field velocities: one forward per field, adapters switched in turn. `models` maps a
    field's adapter name to a model of its own (a full-checkpoint teacher, engine/student.py), evaluated in its own
    forward instead of as an adapter of the shared base."""

    def __init__(self, model: torch.nn.Module, velocity: Velocity, fields: Sequence[Field], uncond: TensorCond,
                 models: Mapping[str, torch.nn.Module] | None = None):
        self.model = model
        self.velocity = velocity
        self.fields = {f.name: f for f in fields}
        self.uncond = uncond
        self.switch = AdapterSwitch(model)
        self.models = dict(models or {})

    def field(self, name: str) -> Field:
        """The field called `name`; KeyError listing the defined ones."""
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; defined: {sorted(self.fields)}")
        return self.fields[name]

    def field_velocity(self, field: Field, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond) -> torch.Tensor:
        """Velocity of one field on all rows of `x`: the row plan's [uncond; cond] forward when guided."""
        own = self.models.get(field.adapter) if field.adapter is not None else None
        model = own if own is not None else self.model
        switch = nullcontext() if own is not None else self.switch.use(field.adapter)
        with nvtx_range(f"field:{field.name}/{field.adapter or 'base'}", "orange"), switch:
            if not field.guided:
                return self.velocity(model, x, sigma, cond)
            per_row = [field] * x.shape[0]
            plan = plan_rows(per_row)
            v = self.velocity(model, *plan.inputs(x, sigma, cond, self.uncond))
            ((_, out),) = plan.combine(v, per_row)
            return out

    def velocities(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond, rows: Sequence[str]) -> torch.Tensor:
        """Each row's velocity under the field named in `rows[i]`; sigma is [B]."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} field names for {x.shape[0]} rows")
        out: torch.Tensor | None = None
        for name in dict.fromkeys(rows):  # first-seen order, deterministic
            idx = [i for i, r in enumerate(rows) if r == name]
            v = self.field_velocity(self.field(name), take(x, idx), take(sigma, idx), take(cond, idx))
            if out is None:
                if len(idx) == x.shape[0]:
                    return v
                out = torch.empty((x.shape[0], *v.shape[1:]), dtype=v.dtype, device=v.device)
            scatter(out, idx, v)
        assert out is not None
        return out


def scatter(out: torch.Tensor, idx: Sequence[int], v: torch.Tensor) -> None:
    """out[idx] = v, by slices where `idx` is a few contiguous runs, else through a cached device index (no
    host-to-device copy per call)."""
    runs = _runs(idx)
    if len(runs) > MAX_RUNS:
        out[device_ints(idx, out.device)] = v
        return
    pos = 0
    for a, b in runs:
        out[a:b] = v[pos:pos + b - a]
        pos += b - a
