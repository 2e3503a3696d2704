"""Capability fields: velocity fields the student is distilled from (DESIGN §1).

A field is a source (a LoRA adapter on the shared base, or the base itself with adapters disabled) plus an
optional classifier-free-guidance operator: v_F = v_u + g (v_c - v_u) with g = `cfg_scale` (g = 1 means
the plain conditional velocity, one forward). Expert teachers, the CFG-absorption field of DanceOPD
(base, g = alpha), the MAR anchor (base or a quality teacher) and the student itself are all fields.

`FieldEvaluator.velocities` is the batched API the trainer uses: rows of one iteration, each tagged with a
field name, in; every row's field velocity out. This reference implementation runs one forward per field
(peft adapters switched in turn, CFG rows concatenated with their unconditional twins); the segmented
multi-LoRA path replaces it with one forward for all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.models.lora import STUDENT, AdapterSwitch
from engine.models.velocity import Cond, predict_velocity
from engine.profiling import nvtx_range
from engine.sampling.steps import cfg_combine


@dataclass(frozen=True)
class Field:
    name: str
    adapter: str | None
    """peft adapter name, or None for the base model (all adapters disabled)."""
    cfg_scale: float = 1.0
    """Guidance scale g of the field's CFG operator; 1.0 = unguided (no unconditional forward)."""

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def student_field(cfg_scale: float = 1.0) -> Field:
    return Field(name=STUDENT, adapter=STUDENT, cfg_scale=cfg_scale)


class FieldEvaluator:
    """Reference evaluation of field velocities: one forward per field, adapters switched in turn."""

    def __init__(self, model: torch.nn.Module, fields: Sequence[Field], uncond: Cond):
        self.model = model
        self.fields = {f.name: f for f in fields}
        self.uncond = uncond
        self.switch = AdapterSwitch(model)

    def field(self, name: str) -> Field:
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; defined: {sorted(self.fields)}")
        return self.fields[name]

    def field_velocity(self, field: Field, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity of one field on all rows of `x` (grad flows if enabled and the adapter is trainable)."""
        with nvtx_range(f"field:{field.name}/{field.adapter or 'base'}", "orange"), self.switch.use(field.adapter):
            if not field.guided:
                return predict_velocity(self.model, x, sigma, cond)
            n = x.shape[0]
            both = Cond.cat([self.uncond.expand(n).to(cond.prompt_embeds.device), cond])
            v = predict_velocity(self.model, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            return cfg_combine(v[:n], v[n:], field.cfg_scale)

    def velocities(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, rows: Sequence[str]
    ) -> torch.Tensor:
        """Each row's velocity under the field named in `rows[i]`; sigma is [B]."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} field names for {x.shape[0]} rows")
        out: torch.Tensor | None = None
        for name in dict.fromkeys(rows):  # first-seen order, deterministic
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            v = self.field_velocity(self.field(name), x[idx], sigma[idx], cond[idx])
            if out is None:
                out = torch.empty((x.shape[0], *v.shape[1:]), dtype=v.dtype, device=v.device)
            out[idx] = v
        assert out is not None
        return out
