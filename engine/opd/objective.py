"""The OPD objective of one micro-batch: states -> query chunks -> transitions -> field targets -> the student's loss.

`states` gives the micro-batch's trajectory: the student's own rollout (on-policy), or DanceOPD's off-policy
ablation (engine/opd/states.py). Its query states are scored in q chunks (one query slot of every sample per
chunk: q = k query states, or every candidate when dense; engine/opd/query.py). For chunk j the objective gathers
the transitions (x_t, x_{t+1}, sigmas, the rollout's log-probs), evaluates the routed fields (and the MAR anchor:
the one place that decides whether it runs) without grad, the student's velocity with grad, the loss, and calls
`backward` on it; the trainer then steps the optimizer (DeepSpeed counts each chunk as a micro-step), so the loss
of an optimizer step is the mean over its query states (`opd.query_weighting = "diffusionopd"`: DiffusionOPD's
weighted sum). Under soft routing a sample's target is the weighted mix of every mixed field's velocity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from engine.backends.base import TensorCond
from engine.config.schema import OPDConfig, RolloutConfig
from engine.fields.evaluator import FieldEvaluator
from engine.fields.field import student_field
from engine.fields.rows import take
from engine.objective import ChunkResult, MicroBatch
from engine.opd.diagnostic import gradient_parts
from engine.opd.losses import Transition, opd_loss
from engine.opd.query import num_candidates, select_queries, state_weight
from engine.opd.routing import SOFT
from engine.opd.states import forward_noised, random_endpoints
from engine.rl.step_rewards import StepRewards
from engine.sampling.rollout import Rollout, SampleNoise, Trajectory, rollout
from engine.transfer import to_device

PhaseRange = Callable[[str, str], AbstractContextManager]
"""`timer.range(name, colour)`: the phase timer's NVTX + wall-time range."""


def opd_chunks(cfg: OPDConfig, steps: int) -> int:
    """Query states per sample: `query_states`, or every candidate state when dense (0)."""
    return cfg.query_states or num_candidates(steps, cfg.query_candidates)


class OPDObjective:
    """The configured OPD loss over one micro-batch's states, chunk by chunk."""

    def __init__(self, cfg: OPDConfig, rollout: RolloutConfig, evaluator: FieldEvaluator, sigmas: torch.Tensor,
                 phase: PhaseRange, *, mix: dict[str, float] | None = None,
                 params: Sequence[torch.nn.Parameter] = (), seed: int = 0,
                 latent_shape: Sequence[int] = (), rewards: StepRewards | None = None):
        self.cfg, self.evaluator, self.sigmas, self.phase = cfg, evaluator, sigmas, phase
        self.steps, self.noise_level, self.group_size = rollout.steps, rollout.noise_level, rollout.group_size
        self.sigma_1 = float(sigmas[1])
        self.chunks = opd_chunks(cfg, rollout.steps)
        """Query states per sample = DeepSpeed micro-steps per micro-batch."""
        self.weight = state_weight(self.chunks, rollout.steps, cfg.query_weighting)
        self.anchor = cfg.anchor if cfg.anchor and cfg.beta > 0 else None
        """The MAR anchor's field, or None when the anchor term is off (no anchor or beta = 0)."""
        self.student = student_field(cfg.student_cfg)
        self.mix = mix
        """Soft routing: field -> normalised weight of every sample's target (Router.mix); None = hard routes."""
        self.params, self.seed, self.latent_shape = list(params), seed, tuple(latent_shape)
        self.rewards = rewards
        """mixed: the step's task rewards -> per-group advantages (engine/rl/step_rewards.py); None otherwise."""

    def diagnose(self, step: int) -> bool:
        """Whether optimizer step `step` logs the gradient diagnostic."""
        return self.cfg.grad_diagnostic > 0 and step % self.cfg.grad_diagnostic == 0

    def prepare(self, step: int, micros: list[MicroBatch]) -> dict[str, float]:
        """mixed: the task advantage of every rollout (rewards over the whole step); else nothing to look at."""
        if self.rewards is None:
            return {}
        with self.phase("rewards", "yellow"):
            return self.rewards(micros)

    def queries(self, micro: MicroBatch, seed: int, step: int) -> torch.Tensor:
        """[B, chunks] state indices of each sample (a pure function of seed and sample id)."""
        q = select_queries(self.steps, micro.sample_ids, self.cfg.query_states, self.cfg.query_bias, seed,
                           self.cfg.query_candidates)
        return to_device(q, self.sigmas.device)  # pinned, non-blocking: the rollout just issued keeps the GPU busy

    def _field_rows(self, routes: list[str]) -> tuple[list[str], list[tuple[float, slice]]]:
        """The target rows of `routes` and how they combine: [(weight, rows of one field block)]."""
        n = len(routes)
        if self.mix is None or routes[0] != SOFT:
            return list(routes), [(1.0, slice(0, n))]
        rows, blocks = [], []
        for i, (name, w) in enumerate(self.mix.items()):
            rows += [name] * n
            blocks.append((w, slice(i * n, (i + 1) * n)))
        return rows, blocks

    def target(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond, routes: list[str]) -> torch.Tensor:
        """The routed target velocity of every row (soft routing: the mix), without grad."""
        rows, blocks = self._field_rows(routes)
        reps = len(rows) // len(routes)
        with torch.no_grad():
            v = self.evaluator.velocities(x.repeat(reps, 1, 1, 1), sigma.repeat(reps),
                                          take(cond, list(range(len(routes))) * reps), rows)
        return v if reps == 1 else sum(w * v[sl] for w, sl in blocks)

    def states(self, student_rollout: Rollout, cond: TensorCond, sample_ids: Sequence[int], routes: list[str],
               step: int) -> Trajectory:
        """The micro-batch's trajectory: the student's rollout, or the off-policy forward-noised endpoints."""
        if self.cfg.states == "on_policy":
            return student_rollout(cond, sample_ids, self.sigmas)
        device = self.sigmas.device
        if self.cfg.offpolicy_endpoint == "random":
            end = random_endpoints(sample_ids, self.latent_shape, self.seed, device)
        else:
            noise = SampleNoise(self.seed, sample_ids, self.latent_shape, device)
            end = rollout(lambda x, s: self.target(x, s, cond, routes), noise, self.sigmas, "ode").samples
        return forward_noised(end, sample_ids, self.sigmas, self.seed)

    def transition(self, traj: Trajectory, queries: torch.Tensor, j: int) -> Transition:
        """The transitions of query slot `j` of every sample."""
        idx = queries[:, j]
        arange = torch.arange(queries.shape[0], device=queries.device)
        return Transition(x=traj.states[idx, arange], x_next=traj.states[idx + 1, arange], sigma=self.sigmas[idx],
                          sigma_next=self.sigmas[idx + 1], sigma_1=self.sigma_1, noise_level=self.noise_level,
                          logp_old=traj.log_probs[idx, arange], group_size=self.group_size)

    def chunk(self, micro: MicroBatch, queries: torch.Tensor, j: int, backward: Callable[[torch.Tensor], None],
              step: int) -> ChunkResult:
        """Score query slot `j`: field targets (no grad), the student's loss, `backward(loss)`; on a diagnosed
        step the gradient diagnostic's terms first (engine/opd/diagnostic.py)."""
        routes, cond, diagnose = micro.routes, micro.cond, self.diagnose(step)
        tr = self.transition(micro.traj, queries, j)
        tr.task_advantage = micro.extra.get("advantages")
        n = len(routes)
        with self.phase("fields", "orange"), torch.no_grad():
            field_rows, blocks = self._field_rows(routes)
            rows = field_rows + ([self.anchor] * n if self.anchor else [])
            reps = len(rows) // n
            v_all = self.evaluator.velocities(tr.x.repeat(reps, 1, 1, 1), tr.sigma.repeat(reps),
                                              take(cond, list(range(n)) * reps), rows)
            v_target = v_all[:n] if len(blocks) == 1 else sum(w * v_all[sl] for w, sl in blocks)
            v_anchor = v_all[len(field_rows):] if self.anchor else None
        with self.phase("student", "red"):
            with self.phase("student/forward", "red"):
                v_student = self.evaluator.field_velocity(self.student, tr.x, tr.sigma, cond)
                out = opd_loss(self.cfg, v_student, v_target, tr, v_anchor)
                if self.weight != 1.0:
                    out.loss = out.loss * self.weight
                    out.terms["loss"] = out.terms["loss"] * self.weight
                    path, score = out.parts
                    out.parts = (None if path is None else path * self.weight,
                                 None if score is None else score * self.weight)
            if diagnose:
                with self.phase("student/diagnostic", "red"):
                    out.terms.update(gradient_parts(*out.parts, self.params))
            target_ok = torch.isfinite(v_all.flatten(1)).all(1)
            student_ok = torch.isfinite(v_student.detach().flatten(1)).all(1)
            with self.phase("student/backward", "red"):
                backward(out.loss)
        per_field = {name: take(out.per_sample, [i for i, r in enumerate(routes) if r == name]).mean()
                     for name in dict.fromkeys(routes)}
        return ChunkResult(out, rows, target_ok, student_ok, per_field)
