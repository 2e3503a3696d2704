"""The OPD objective of one micro-batch: query chunks -> transitions -> field targets -> the student's loss.

Each micro-batch's query states are scored in q chunks (one query slot of every sample per chunk: q = k query
states, or T - 1 when dense). For chunk j the objective gathers the transitions (x_t, x_{t+1}, sigmas, the rollout's
log-probs), evaluates the routed fields (and the MAR anchor: the one place that decides whether it runs) without
grad, the student's velocity with grad, the loss, and calls `backward` on it; the trainer then steps the optimizer
(DeepSpeed counts each chunk as a micro-step), so the loss of an optimizer step is the mean over its query states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from engine.backends.base import TensorCond
from engine.config.schema import OPDConfig, RolloutConfig
from engine.fields.evaluator import FieldEvaluator
from engine.fields.field import student_field
from engine.fields.rows import take
from engine.opd.losses import LossOutput, Transition, opd_loss
from engine.opd.query import select_queries
from engine.sampling.rollout import Trajectory
from engine.transfer import to_device

PhaseRange = Callable[[str, str], AbstractContextManager]
"""`timer.range(name, colour)`: the phase timer's NVTX + wall-time range."""


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


class OPDObjective:
    """The configured OPD loss over one micro-batch's rollout, chunk by chunk."""

    def __init__(self, cfg: OPDConfig, rollout: RolloutConfig, evaluator: FieldEvaluator, sigmas: torch.Tensor,
                 phase: PhaseRange):
        self.cfg, self.evaluator, self.sigmas, self.phase = cfg, evaluator, sigmas, phase
        self.steps, self.noise_level = rollout.steps, rollout.noise_level
        self.sigma_1 = float(sigmas[1])
        self.chunks = cfg.query_states or (rollout.steps - 1)
        """Query states per sample = DeepSpeed micro-steps per micro-batch."""
        self.anchor = cfg.anchor if cfg.anchor and cfg.beta > 0 else None
        """The MAR anchor's field, or None when the anchor term is off (no anchor or beta = 0)."""
        self.student = student_field(cfg.student_cfg)

    def queries(self, sample_ids: Sequence[int], seed: int) -> torch.Tensor:
        """[B, chunks] state indices of each sample (a pure function of seed and sample id)."""
        return to_device(select_queries(self.steps, sample_ids, self.cfg.query_states, self.cfg.query_bias, seed),
                         self.sigmas.device)  # pinned, non-blocking: the rollout just issued keeps the GPU busy

    def transition(self, traj: Trajectory, queries: torch.Tensor, j: int) -> Transition:
        """The transitions of query slot `j` of every sample."""
        idx = queries[:, j]
        arange = torch.arange(queries.shape[0], device=queries.device)
        return Transition(x=traj.states[idx, arange], x_next=traj.states[idx + 1, arange], sigma=self.sigmas[idx],
                          sigma_next=self.sigmas[idx + 1], sigma_1=self.sigma_1, noise_level=self.noise_level,
                          logp_old=traj.log_probs[idx, arange])

    def chunk(self, traj: Trajectory, queries: torch.Tensor, j: int, routes: list[str], cond: TensorCond,
              backward: Callable[[torch.Tensor], None]) -> ChunkResult:
        """Score query slot `j`: field targets (no grad), the student's loss, `backward(loss)`."""
        tr = self.transition(traj, queries, j)
        n = len(routes)
        with self.phase("fields", "orange"), torch.no_grad():
            rows = routes + ([self.anchor] * n if self.anchor else [])
            reps = len(rows) // n
            v_all = self.evaluator.velocities(tr.x.repeat(reps, 1, 1, 1), tr.sigma.repeat(reps),
                                              take(cond, list(range(n)) * reps), rows)
            v_target = v_all[:n]
            v_anchor = v_all[n:] if self.anchor else None
        with self.phase("student", "red"):
            with self.phase("student/forward", "red"):
                v_student = self.evaluator.field_velocity(self.student, tr.x, tr.sigma, cond)
                out = opd_loss(self.cfg, v_student, v_target, tr, v_anchor)
            target_ok = torch.isfinite(v_all.flatten(1)).all(1)
            student_ok = torch.isfinite(v_student.detach().flatten(1)).all(1)
            with self.phase("student/backward", "red"):
                backward(out.loss)
        per_field = {name: take(out.per_sample, [i for i, r in enumerate(routes) if r == name]).mean()
                     for name in dict.fromkeys(routes)}
        return ChunkResult(out, rows, target_ok, student_ok, per_field)
