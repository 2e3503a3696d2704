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
from engine.opd.objective import OPDObjective, PhaseRange
from engine.opd.query import num_candidates


def chunks_of(c: Config) -> int:
    """Query chunks per micro-batch of run `c` (DeepSpeed's micro-steps per micro-batch), known before the model."""
    if c.rl.loss:
        return c.rl.sde_window or max(1, int(c.rl.timestep_fraction * (c.rollout.steps - 1)))
    return c.opd.query_states or num_candidates(c.rollout.steps, c.opd.query_candidates)


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
        return OPDObjective(c.opd, c.rollout, evaluator, sigmas, phase, mix=mix, params=params, seed=c.train.seed,
                            latent_shape=spec.latent_shape)
    from engine.backends.decode import make_decoder
    from engine.rl.objective import GRPOObjective
    from engine.rl.rewards import RewardModel

    model_dir: Path | None = resolve_path(c.model.path) if c.model.path else None
    decode = make_decoder(backend, model_dir, spec.latent_shape, comm.device)
    reference = fields[c.rl.reference] if c.rl.reference else Field("reference", None, c.rollout.cfg_scale)
    return GRPOObjective(c.rl, c.rollout, evaluator, sigmas, phase, RewardModel.from_config(c.rl, comm.device),
                         decode, comm.gather, reference, c.train.seed)
