"""The config checks of [validation] and [tracking] that need the scorer registry or the files (called by
engine/config/load.py's `validate` and engine/config/preflight.py): scorer names, each scorer's weights (a local
dir that exists, a server URL), the validation prompt file, the tracker packages, ZeRO-3 on several ranks."""

from __future__ import annotations

import importlib.util
import json
import os

from engine.config.io import deepspeed_json, resolve_path
from engine.config.schema import Config


def config_problems(c: Config) -> list[str]:
    """Unknown scorer names in validation.scorers (pure lookups: importing a scorer loads no weights)."""
    from engine.eval.scorers import find_scorer, scorer_names
    from engine.eval.table import CARD

    p: list[str] = []
    for name in c.validation.scorers:
        if find_scorer(name) is None:
            p.append(f"validation.scorers.{name}: unknown scorer; valid: {', '.join(scorer_names())}")
    if c.validation.select == "average" and not set(c.validation.scorers) & set(CARD):
        p.append(f"validation.select = 'average' is the Flow-OPD card's average: it needs one of the scorers "
                 f"{', '.join(CARD)} in validation.scorers")
    return p


def path_problems(c: Config) -> list[str]:
    """Missing scorer weights and prompt files, each naming the key, the scorer and the path."""
    from engine.eval.scorers import find_scorer

    p: list[str] = []
    v = c.validation
    for name, path in v.scorers.items():
        entry = find_scorer(name)
        if entry is None:
            continue  # reported by config_problems
        if entry.weights == "dir" and not (path and resolve_path(path).is_dir()):
            p.append(f"validation.scorers.{name}: scorer weights not found: {path or '(empty path)'} (a local dir; "
                     f"see docs/evaluation.md)")
        elif entry.weights == "url" and not path.startswith(("http://", "https://")):
            p.append(f"validation.scorers.{name} = {path!r}: expected the reward server's http:// URL")
    if v.every > 0 and v.prompt_file and not v.prompt_file.startswith("builtin:"):
        if not resolve_path(v.prompt_file).is_file():
            p.append(f"validation.prompt_file: prompt file not found: {v.prompt_file}")
    return p


def environment_problems(c: Config) -> list[str]:
    """Tracker packages that are not installed; ZeRO stage 3 with several ranks (rank 0 samples alone)."""
    p: list[str] = []
    if c.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        p.append("tracking.tensorboard = true needs the tensorboard package (pip install tensorboard), or set "
                 "tracking.tensorboard = false")
    if c.tracking.wandb and importlib.util.find_spec("wandb") is None:
        p.append("tracking.wandb = true needs the wandb package (pip install wandb), or set tracking.wandb = false")
    if c.validation.every > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            stage = int(json.loads(deepspeed_json(c).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, AttributeError):
            stage = 0  # an unreadable DeepSpeed JSON is reported by check_environment
        if stage == 3:
            p.append("validation.every > 0 samples on rank 0 alone, but ZeRO stage 3 (train.deepspeed) shards the "
                     "student across ranks, so rank 0 cannot run a forward by itself: use stage <= 2 or "
                     "validation.every = 0")
    return p
