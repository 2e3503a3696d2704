"""Flow-GRPO as an objective of the trainer (engine/objective.py): rewards of the step's final images,
group-relative advantages over the step (every rank's groups), the clipped policy loss on the training states.

Faithful to yifan123/flow_grpo scripts/train_sd3.py@ac4c86e (and the Fast variant of its refactored
scripts/train_sd3_fast.py) except where a named option or the docstring says otherwise:
- training states: the first int(timestep_fraction x (T - 1)) transitions (train_sd3.py trains
  int(T x timestep_fraction), the last into sigma 0 included; the Fast code excludes it: its Gaussian is too sharp
  for a stable log-prob, we follow the Fast code); with `sde_window` W the rollout is SDE only on W consecutive steps
  starting uniformly in [lo, hi - W] (train_sd3_fast's sde_window_range) and trains on them. The start is drawn
  from (seed, step), the same on every rank (Fast seeds python's `random` with the process index: each rank its own
  window), so 1 rank x 2P prompts equals 2 ranks x P.
- advantages over one optimizer step's images (flow_grpo normalises over an epoch's samples, which it then trains
  in several optimizer steps; here an optimizer step is the unit of sampling), in the order of global sample ids.
- the policy log-prob is the student's under the rollout's guidance (train.cfg with sample.guidance_scale), the
  KL's reference the base with adapters disabled (or `rl.reference`) under the same guidance.
- samples are trained in their rollout order (flow_grpo shuffles them before re-batching; the mean loss of an
  optimizer step is the same either way, the order only changes float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from engine import rng
from engine.backends.base import TensorCond
from engine.config.rl_schema import RLConfig
from engine.config.schema import RolloutConfig
from engine.fields.evaluator import FieldEvaluator
from engine.fields.field import Field, student_field
from engine.objective import ChunkResult, MicroBatch
from engine.opd.losses import LossOutput, Transition
from engine.ops import sde_step
from engine.rl.grpo import grpo_loss
from engine.rl.rewards import RewardModel
from engine.rl.step_rewards import Decode, Gather, StepRewards
from engine.sampling.rollout import Rollout, Trajectory

PhaseRange = Callable[[str, str], AbstractContextManager]


def grpo_chunks(cfg: RLConfig, steps: int) -> int:
    """Trained states per sample: the SDE window, or the first int(timestep_fraction x (T - 1)) transitions."""
    return cfg.sde_window or max(1, int(cfg.timestep_fraction * (steps - 1)))


class GRPOObjective:
    """Flow-GRPO on the student's SDE rollouts (see the module docstring)."""

    def __init__(self, cfg: RLConfig, rollout: RolloutConfig, evaluator: FieldEvaluator, sigmas: torch.Tensor,
                 phase: PhaseRange, reward: RewardModel, decode: Decode, gather: Gather, reference: Field, seed: int):
        self.cfg, self.evaluator, self.sigmas, self.phase, self.seed = cfg, evaluator, sigmas, phase, seed
        self.reference = reference
        self.rewards = StepRewards(cfg, reward, decode, gather, sigmas.device)
        self.noise_level = rollout.noise_level
        self.sigma_1 = float(sigmas[1])
        self.student = student_field(rollout.cfg_scale)
        self.chunks = grpo_chunks(cfg, rollout.steps)
        self.window_range = ((tuple(cfg.sde_window_range) if cfg.sde_window_range else (0, rollout.steps // 2))
                             if cfg.sde_window else None)

    def window_start(self, step: int) -> int:
        """First SDE step of optimizer step `step` (0 without a window), a pure function of (seed, step)."""
        if self.window_range is None:
            return 0
        lo, hi = self.window_range
        g = rng.generator(self.seed, rng.RL, step)
        return lo + int(torch.randint(hi - self.chunks - lo + 1, (1,), generator=g))

    def sde_steps(self, step: int) -> Sequence[int] | None:
        """The SDE window of step `step` (None: SDE on every step)."""
        if self.window_range is None:
            return None
        start = self.window_start(step)
        return range(start, start + self.chunks)

    def states(self, student_rollout: Rollout, cond: TensorCond, sample_ids: Sequence[int], routes: list[str],
               step: int) -> Trajectory:
        """The student's rollout, SDE on the step's window only (the "Fast" variant; everywhere without one)."""
        return student_rollout(cond, sample_ids, self.sigmas, self.sde_steps(step))

    def prepare(self, step: int, micros: list[MicroBatch]) -> dict[str, float]:
        """Reward every final image, normalise per prompt group over the step (all ranks), attach advantages."""
        with self.phase("rewards", "yellow"):
            return self.rewards(micros)

    def queries(self, micro: MicroBatch, seed: int, step: int) -> torch.Tensor:
        """[B, chunks]: the training states, the same for every sample (the window's, or the first ones)."""
        start = self.window_start(step)
        idx = torch.arange(start, start + self.chunks, device=self.sigmas.device)
        return idx.expand(len(micro.sample_ids), -1)

    def chunk(self, micro: MicroBatch, queries: torch.Tensor, j: int, backward: Callable[[torch.Tensor], None],
              step: int) -> ChunkResult:
        """The clipped policy loss (+ beta KL) on training state `j` of every sample, then `backward`."""
        idx = queries[:, j]
        ar = torch.arange(queries.shape[0], device=queries.device)
        traj = micro.traj
        tr = Transition(x=traj.states[idx, ar], x_next=traj.states[idx + 1, ar], sigma=self.sigmas[idx],
                        sigma_next=self.sigmas[idx + 1], sigma_1=self.sigma_1, noise_level=self.noise_level,
                        logp_old=traj.log_probs[idx, ar])
        kl, rows = None, []
        target_ok = torch.ones(0, dtype=torch.bool, device=tr.x.device)
        with self.phase("student", "red"):
            with self.phase("student/forward", "red"):
                v = self.evaluator.field_velocity(self.student, tr.x, tr.sigma, micro.cond)
                move = sde_step(tr.x, v, tr.sigma, tr.sigma_next, tr.sigma_1, tr.noise_level, prev_sample=tr.x_next)
                if self.cfg.beta > 0:
                    with self.phase("fields", "orange"), torch.no_grad():
                        v_ref = self.evaluator.field_velocity(self.reference, tr.x, tr.sigma, micro.cond)
                        mu_ref = sde_step(tr.x, v_ref, tr.sigma, tr.sigma_next, tr.sigma_1, tr.noise_level,
                                          prev_sample=tr.x_next).mean.float()
                    rows, target_ok = [self.reference.name] * len(ar), torch.isfinite(v_ref.flatten(1)).all(1)
                    sq = ((move.mean.float() - mu_ref) ** 2).mean(dim=tuple(range(1, mu_ref.ndim)))
                    kl = sq / (2 * move.std**2)
                terms = grpo_loss(move.log_prob, tr.logp_old, micro.extra["advantages"], micro.extra["keep"],
                                  clip_range=self.cfg.clip_range, adv_clip=self.cfg.adv_clip, kl=kl,
                                  beta=self.cfg.beta, normalizer=micro.extra["normalizer"])
            student_ok = torch.isfinite(v.detach().flatten(1)).all(1)
            with self.phase("student/backward", "red"):
                backward(terms.loss)
        out = LossOutput(loss=terms.loss, per_sample=move.log_prob.detach(), terms=terms.terms)
        return ChunkResult(out, rows, target_ok, student_ok, {})
