"""Resuming never mixes two configs: what a re-run's config may change against the config stored in the checkpoint.

Every checkpoint stores the resolved config it was trained with (`meta.config` in its manifest). A re-run compares
every key; each differing key is one of three kinds:

- **operational** (changes where and how often things are written, how long the run goes, what is evaluated; not
  what a step computes): `OPERATIONAL`. Allowed, logged. `train.steps` is here because the learning-rate schedule is
  constant after warm-up (engine/trainer.py), so extending a run continues the same curve.
- **implementation** (the same function computed another way: kernel backends, the attention implementation,
  recomputation, the field evaluator, the DeepSpeed JSON's comm settings): `IMPLEMENTATION`. Allowed with a warning:
  the numbers then differ from an uninterrupted run at rounding level (kernel and reference agree to ~1e-6 in float32,
  tests/test_ops.py), so the continued run is no longer bit-exact, but it is the same training. These choices also
  resolve differently per machine (`kernels.default = "auto"`), and refusing them would forbid resuming on another
  node type.
- **trajectory**: everything else, including any key added to the schema later (default deny): the model, student,
  teachers, fields, cold start, data, rollout, objective, optimizer, seed, dtype, and `kernels.cuda_graphs` (it
  switches the SDE noise to the in-kernel Philox stream). A change is refused with the list of changed keys
  (old -> new) unless `--allow-config-change`; then each change is logged and the old config is kept beside the run
  as `config.step_<N>.toml`. `train.prompts_per_step` is per rank, so it is compared as the global batch
  (x ranks): a run resumed on another number of ranks with the same global batch is the same run.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from engine.config.io import from_dict
from engine.config.schema import Config

OPERATIONAL = ("output_dir", "train.steps", "train.save_every", "train.keep_checkpoints", "train.log_every",
               "train.max_nonfinite", "train.profile_steps", "train.step_timeout", "data.cache", "data.image_cache",
               "report", "experiment", "validation", "tracking",
               "opd.grad_diagnostic")  # the diagnostic measures gradients; the update is unchanged (tested)
IMPLEMENTATION = ("model.attention", "model.attention_backend", "model.gradient_checkpointing", "opd.evaluator",
                  "kernels.default", "kernels.backends", "train.deepspeed")
# checkpoints written before configs were stored carry a digest of these two sections only
_LEGACY_SECTIONS = ("model", "student")
PER_RANK, GLOBAL_BATCH = "train.prompts_per_step", "train.prompts_per_step x ranks"
# the tables of the config ([model], [train], ...): their keys are compared one by one
_SECTIONS = tuple(name for name, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp))


@dataclass(frozen=True)
class ResumePolicy:
    """What a re-run may do that a plain re-run refuses (engine/train.py flags)."""
    allow_config_change: bool = False
    """`--allow-config-change`: resume although trajectory-relevant keys changed (each is logged)."""
    restart: bool = False
    """`--restart`: start at step 0 although metrics.jsonl holds steps no checkpoint is left for."""


@dataclass(frozen=True)
class Change:
    """One key that differs between the checkpoint's config and the re-run's."""
    key: str
    old: Any
    new: Any
    kind: str
    """trajectory, implementation or operational."""

    def __str__(self) -> str:
        return f"{self.key}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def kind_of(key: str) -> str:
    """Whether a change of `key` is operational, implementation or trajectory (see the module docstring)."""
    if _matches(key, OPERATIONAL):
        return "operational"
    if _matches(key, IMPLEMENTATION):
        return "implementation"
    return "trajectory"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config dict: tables recurse, `teachers`/`fields` items become `teachers[0].name`, other lists
    and the free-form tables (routes, weights, task weights, backends) are compared whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name in _SECTIONS:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}[{i}]."))
            out[f"{name}.count"] = len(value)
        else:
            out[name] = value
    return out


def stored_config(meta: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...] | None] | None:
    """(the checkpoint's config as flat keys, the sections it covers or None for all), or None when the checkpoint
    stores no config at all. A stored config lacking keys added to the schema since gets their defaults."""
    if isinstance(meta.get("config"), dict):
        problems: list[str] = []  # keys removed from the schema since: nothing to compare them with
        config = from_dict(Config, meta["config"], "", problems)
        return flatten(dataclasses.asdict(config)), None
    if isinstance(meta.get("resume_digest"), str):
        try:
            return flatten(json.loads(meta["resume_digest"])), _LEGACY_SECTIONS
        except ValueError:
            return None
    return None


def config_changes(stored: dict[str, Any], sections: tuple[str, ...] | None, config: Config,
                   ranks: tuple[int, int] = (1, 1)) -> list[Change]:
    """Every key whose value differs between `stored` (flat) and `config`, in key order; `sections` limits the
    comparison to those sections (a legacy checkpoint's digest). `ranks` = (the checkpoint's world size, this run's):
    `train.prompts_per_step` is per rank, so what must match is the global batch, prompts_per_step x ranks (the data,
    noise and routing of a step depend only on it: 1 rank x 2P prompts = 2 ranks x P)."""
    stored, now = dict(stored), flatten(dataclasses.asdict(config))
    if PER_RANK in stored:
        stored[GLOBAL_BATCH], now[GLOBAL_BATCH] = stored.pop(PER_RANK) * ranks[0], now.pop(PER_RANK) * ranks[1]
    keys = sorted(set(stored) | set(now))
    if sections is not None:
        keys = [k for k in keys if _matches(k, sections)]
    missing = object()
    return [Change(k, stored.get(k), now.get(k), kind_of(k)) for k in keys
            if stored.get(k, missing) != now.get(k, missing)]
