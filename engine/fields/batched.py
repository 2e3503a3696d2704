"""Every field's velocity in ONE forward of the shared base (DESIGN §3): the segmented multi-LoRA evaluator.

`BatchedFieldEvaluator` is a drop-in for the reference `PeftFieldEvaluator`: `velocities(x, sigma, cond, rows)`
lays out the rows of all fields with the row plan (a CFG field contributes a conditional and an unconditional row,
rows grouped by adapter slot), runs one forward with the segmented layers of `engine.adapters.multi_lora` active,
and combines CFG afterwards. A family whose rows of different kinds run as separate forwards
(`TensorCond.forward_groups`: Z-Image's text-to-image and edit rows) gets one segmented forward per group, each with
its own rows' segment metadata.

Rows of a field with a model of its own (a full-checkpoint teacher, `models`) run in that model's forward, apart
from the batched one.

Gradients: with grad enabled, rows of the trainable (student) adapter are by default evaluated in their own
forward and the frozen fields in one no-grad batched forward (`fuse_grad=False`). Fusing them makes autograd
keep activations for and back-propagate through every frozen row too, which costs (rows_total / rows_student)
x the student's backward; at K routed CFG teachers + anchor that is 4x at K = 1 per student row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch

from engine.adapters.lora import STUDENT
from engine.adapters.multi_lora import SegmentBatch, install_multi_lora
from engine.backends.base import TensorCond
from engine.fields.evaluator import PeftFieldEvaluator, Velocity, scatter
from engine.fields.field import Field
from engine.fields.rows import plan_rows, take
from engine.profiling import nvtx_range


class BatchedFieldEvaluator(PeftFieldEvaluator):
    """`PeftFieldEvaluator` with every field's velocity from one segmented multi-LoRA forward of the base.

    `reference=True` keeps the per-field peft loop of the parent class (same API, same results).
    `fuse_grad=True` puts the trainable adapter's rows into the same forward even when grad is enabled
    (see the module docstring for why that is off by default). `merge_rows` (`kernels.lora_merge_rows`): frozen
    adapters' segments of at least that many token rows run against merged weights (engine/adapters/multi_lora.py).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        velocity: Velocity,
        fields: Sequence[Field],
        uncond: TensorCond,
        *,
        trainable: str | None = STUDENT,
        reference: bool = False,
        fuse_grad: bool = False,
        merge_rows: int = 0,
        models: Mapping[str, torch.nn.Module] | None = None,
    ):
        super().__init__(model, velocity, fields, uncond, models)
        self.reference = reference
        self.fuse_grad = fuse_grad
        self.state = install_multi_lora(model, trainable, merge_rows=merge_rows)

    def _trainable_field(self, f: Field) -> bool:
        """The field's adapter is the trainable one and its peft parameters require grad."""
        if f.adapter is None or f.adapter != self.state.trainable:
            return False
        for layer in self.state.layers:
            if f.adapter in layer.lora_A:
                return layer.lora_A[f.adapter].weight.requires_grad or layer.lora_B[f.adapter].weight.requires_grad
        return False

    def velocities(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond, rows: Sequence[str]) -> torch.Tensor:
        """Each row's velocity under the field named in `rows[i]` (sigma [B]); frozen fields without grad."""
        if self.reference:
            return super().velocities(x, sigma, cond, rows)
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} field names for {x.shape[0]} rows")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        fields = [self.field(r) for r in rows]
        split = torch.is_grad_enabled() and not self.fuse_grad
        grad_names = {f.name for f in fields if split and self._trainable_field(f)}
        # full-checkpoint teachers are other models: their rows run in their own forward, after the batched one
        own = {f.name for f in fields if f.adapter is not None and f.adapter in self.models}
        batched = [i for i, f in enumerate(fields) if f.name not in grad_names | own]
        parts: list[tuple[list[int], torch.Tensor]] = []
        if batched:
            with torch.no_grad() if split else nullcontext():
                parts += self._batched(x, sigma, cond, fields, batched)
        for name in dict.fromkeys(f.name for f in fields if f.name in grad_names | own):
            idx = [i for i, f in enumerate(fields) if f.name == name]
            parts.append((idx, self.field_velocity(self.field(name), take(x, idx), take(sigma, idx), take(cond, idx))))
        v0 = parts[0][1]
        out = torch.empty((x.shape[0], *v0.shape[1:]), dtype=v0.dtype, device=v0.device)
        for idx, v in parts:
            scatter(out, idx, v)
        return out

    def _batched(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond, fields: Sequence[Field], rows: list[int]
    ) -> list[tuple[list[int], torch.Tensor]]:
        plan = plan_rows(fields, rows, self.state.slot)
        names = ",".join(dict.fromkeys(fields[i].name for i in rows))
        xs, sigmas, conds = plan.inputs(x, sigma, cond, self.uncond)
        groups = conds.forward_groups()  # rows the family runs as separate forwards (Z-Image: T2I vs edit rows)
        with nvtx_range(f"fields:batched[{names}]", "orange"):
            if len(groups) == 1:
                with self.state.segments(SegmentBatch.from_slots(plan.slots, x.device)):
                    v = self.velocity(self.model, xs, sigmas, conds)
            else:  # one segmented forward per group, each with its own rows' segment metadata
                parts = []
                for g in groups:
                    with self.state.segments(SegmentBatch.from_slots([plan.slots[i] for i in g], x.device)):
                        parts.append((g, self.velocity(self.model, take(xs, g), take(sigmas, g), take(conds, g))))
                v = torch.empty((len(plan), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype, device=x.device)
                for g, vg in parts:
                    scatter(v, g, vg)
        return plan.combine(v, fields)
