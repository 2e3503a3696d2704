"""What the trainer asks of a training objective (OPD in engine/opd/objective.py, Flow-GRPO in engine/rl/objective.py).

One optimizer step runs in two phases: every micro-batch is rolled out first (`MicroBatch`), then `prepare` sees all
of them (Flow-GRPO normalises rewards over the step's groups, across ranks), then each micro-batch is scored in
`chunks` query chunks, each one DeepSpeed micro-step. Rolling out before training changes nothing for OPD: the
student's parameters only change at the optimizer step, and every random draw is keyed by (seed, step, sample id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.backends.base import TensorCond
from engine.opd.losses import LossOutput
from engine.sampling.rollout import Rollout, Trajectory


@dataclass
class MicroBatch:
    """One rolled-out micro-batch of one rank."""

    index: int
    """Micro-batch index within the optimizer step."""
    sample_ids: list[int]
    prompt_ids: list[int]
    """Index of each sample's prompt in the prompt set (its GRPO group key)."""
    prompts: list[str]
    tasks: list[str]
    routes: list[str]
    """The field of every sample (OPD's routing)."""
    cond: TensorCond
    traj: Trajectory
    extra: dict[str, Any] = field(default_factory=dict)
    """What `prepare` attaches for the chunks (GRPO: advantages, kept)."""


@dataclass
class ChunkResult:
    """One chunk's loss and what a non-finite step's diagnosis needs (device tensors: no host sync)."""

    out: LossOutput
    rows: list[str]
    """Field of every target row (routed fields, then the anchor's rows)."""
    target_ok: torch.Tensor
    """[rows] finite target velocities."""
    student_ok: torch.Tensor
    """[B] finite student velocities."""
    per_field: dict[str, torch.Tensor]
    """field name -> mean main term of the rows routed to it."""


class Objective(Protocol):
    """A training objective over the student's own rollouts."""

    chunks: int
    """Query chunks per micro-batch = DeepSpeed micro-steps per micro-batch."""

    def states(self, student_rollout: Rollout, cond: TensorCond, sample_ids: Sequence[int], routes: list[str],
               step: int) -> Trajectory:
        """The micro-batch's trajectory at optimizer step `step`: the student's rollout (Flow-GRPO: SDE only in
        the step's window), or states of the objective's own (OPD's off-policy ablation)."""
        ...

    def prepare(self, step: int, micros: list[MicroBatch]) -> dict[str, float]:
        """Look at every micro-batch of the step before training on any (rewards); returns scalars to log."""
        ...

    def queries(self, micro: MicroBatch, seed: int, step: int) -> torch.Tensor:
        """[B, chunks] state indices of each sample."""
        ...

    def chunk(self, micro: MicroBatch, queries: torch.Tensor, j: int, backward: Callable[[torch.Tensor], None],
              step: int) -> ChunkResult:
        """Score query slot `j` of optimizer step `step` and call `backward` on its loss."""
        ...
