"""The trainer's objective, chosen by the config: Flow-GRPO when `rl.loss` is set, else the OPD objective."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.backends.base import ModelBackend, ModelSpec
from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.distributed import Collectives
from engine.fields.evaluator import FieldEvaluator
from engine.fields.field import Field
from engine.objective import Objective
from engine.opd.objective import OPDObjective, PhaseRange, opd_chunks
from engine.rl.step_rewards import Decode, StepRewards


def chunks_of(c: Config) -> int:
    """Query chunks per micro-batch of run `c` (DeepSpeed's micro-steps per micro-batch), known before the model."""
    from engine.rl.objective import grpo_chunks

    return grpo_chunks(c.rl, c.rollout.steps) if c.rl.loss else opd_chunks(c.opd, c.rollout.steps)


def build_objective(c: Config, evaluator: FieldEvaluator, fields: dict[str, Field], sigmas: torch.Tensor,
                    phase: PhaseRange, backend: ModelBackend, spec: ModelSpec, comm: Collectives, *,
                    mix: dict[str, float] | None = None, params: Sequence[torch.nn.Parameter] = ()) -> Objective:
    """The objective of run `c` on `evaluator` (its fields by name in `fields`; OPD's soft-routing `mix` and the
    trainable `params` its gradient diagnostic reads)."""
    objective = _build(c, evaluator, fields, sigmas, phase, backend, spec, comm, mix, params)
    assert objective.chunks == chunks_of(c), (objective.chunks, chunks_of(c))
    return objective


def _build(c: Config, evaluator: FieldEvaluator, fields: dict[str, Field], sigmas: torch.Tensor, phase: PhaseRange,
           backend: ModelBackend, spec: ModelSpec, comm: Collectives, mix: dict[str, float] | None,
           params: Sequence[torch.nn.Parameter]) -> Objective:
    if not c.rl.loss:
        rewards = _step_rewards(c, backend, spec, comm) if c.opd.loss == "mixed" else None
        return OPDObjective(c.opd, c.rollout, evaluator, sigmas, phase, mix=mix, params=params, seed=c.train.seed,
                            latent_shape=spec.latent_shape, rewards=rewards)
    from engine.rl.objective import GRPOObjective
    from engine.rl.rewards import RewardModel

    reward = RewardModel.from_config(c.rl, comm.device)
    reference = fields[c.rl.reference] if c.rl.reference else Field("reference", None, c.rollout.cfg_scale)
    return GRPOObjective(c.rl, c.rollout, evaluator, sigmas, phase, reward, _decoder(c, backend, spec, comm),
                         comm.gather, reference, c.train.seed)


def _decoder(c: Config, backend: ModelBackend, spec: ModelSpec, comm: Collectives) -> Decode:
    """latents -> images through the family's VAE (the miniature worlds: their own decoder)."""
    from engine.backends.decode import make_decoder

    model_dir: Path | None = resolve_path(c.model.path) if c.model.path else None
    return make_decoder(backend, model_dir, spec.latent_shape, comm.device)


def _step_rewards(c: Config, backend: ModelBackend, spec: ModelSpec, comm: Collectives) -> StepRewards:
    """The `[rl]` rewards of OPD's mixed mode, normalised per prompt group over the step."""
    from engine.rl.rewards import RewardModel

    return StepRewards(c.rl, RewardModel.from_config(c.rl, comm.device), _decoder(c, backend, spec, comm),
                       comm.gather, comm.device)
