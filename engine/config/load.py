"""`load_config`: file + overrides -> a validated `Config` (defaults of the model family filled in), or one
`ConfigError` listing every problem; and the `[experiment]` variants' configs.

Validation runs in three rings: each section's `problems()` (engine/config/schema.py), the model family's and the
miniature world's own checks (their plug-ins), and with `paths=True` the preflight (files, environment, the real
architecture on the meta device; engine/config/preflight.py).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from engine.config.io import REPO_ROOT, apply_override, from_dict, override_key, read_file
from engine.config.schema import Config
from engine.errors import ConfigError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy.toml"
# keys a variant may not override: it runs in <output_dir>/variants/<name> and has no report or variants of its own
_VARIANT_FIXED = ("output_dir", "report", "experiment")


def _resolve_defaults(config: Config, data: dict) -> None:
    """Fill in what the config file (raw `data`) leaves to the model family: the student's LoRA targets when the
    key is absent (an explicit empty list stays empty, and is reported)."""
    from engine.backends import get_backend

    student = data.get("student")
    if not isinstance(student, dict) or "targets" not in student:
        try:
            config.student.targets = list(get_backend(config.model.family).default_lora_targets)
        except KeyError:
            pass  # reported by validate


def validate(c: Config) -> list[str]:
    """Every impossible value and dangling reference in `c`, including the family's and the world's checks."""
    from engine.backends import get_backend
    from engine.config.schema import choice
    from engine.fields.field import OPERATORS
    from engine.opd.losses import loss_names
    from engine.worlds import find_world, world_names

    p = c.problems()
    choice(p, "opd.loss", c.opd.loss, tuple(loss_names()))
    for i, f in enumerate(c.fields):
        choice(p, f"fields[{i}].operator", f.operator, tuple(OPERATORS))
    try:
        p += get_backend(c.model.family).config_problems(c)
    except KeyError as exc:
        p.append(f"model.family = {c.model.family!r}: {exc.args[0]}")
    if c.report.world:
        world = find_world(c.report.world)
        if world is None:
            p.append(f"report.world = {c.report.world!r}; valid: {', '.join(world_names())}")
        elif c.report.enabled or c.report.eval_every:
            p += world.config_problems(c)
    from engine.eval.checks import config_problems

    p += config_problems(c)
    p += _variant_problems(c)
    return p


def _variant_problems(c: Config) -> list[str]:
    variants = c.experiment.variants
    p: list[str] = []
    if variants and not c.report.enabled:
        p.append("experiment.variants are trained for the report's table: set report.enabled = true")
    if c.report.label in variants:
        p.append(f"experiment.variants.{c.report.label!r}: the same name as report.label")
    dirs: dict[str, str] = {}
    for name, overrides in variants.items():
        bad = [o for o in overrides if (override_key(o) or [""])[0] in _VARIANT_FIXED]
        if bad:
            p.append(f"experiment.variants.{name!r}: {bad} cannot be overridden in a variant (it runs in "
                     f"<output_dir>/variants/<name> and has no report or variants of its own)")
            continue
        slug = variant_dir_name(name)
        if slug in dirs:
            p.append(f"experiment.variants.{name!r} and {dirs[slug]!r} map to the same directory variants/{slug}")
        dirs[slug] = name
        try:
            variant_config(c, name)
        except ConfigError as exc:
            p.extend(f"experiment.variants.{name!r}: {q}" for q in exc.problems)
    return p


def variant_dir_name(name: str) -> str:
    """`OPD student (DanceOPD, MSE)` -> `opd-student-danceopd-mse`: the variant's run dir under variants/."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"


def variant_config(c: Config, name: str) -> Config:
    """The experiment variant `name`: `c` with the variant's overrides, run in `<output_dir>/variants/<dir>`,
    without variants or a report table of its own (its reward curve is kept). Raises ConfigError listing every
    problem."""
    problems: list[str] = []
    data = dataclasses.asdict(c)
    for assignment in c.experiment.variants[name]:
        apply_override(data, assignment, problems)
    data["output_dir"] = str(Path(c.output_dir) / "variants" / variant_dir_name(name))
    data["report"] = {**data["report"], "enabled": False, "label": name}
    data["experiment"] = {**data["experiment"], "variants": {}}
    config = from_dict(Config, data, "", problems)
    _resolve_defaults(config, data)
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


def experiment_runs(c: Config) -> list[tuple[str, Config]]:
    """(row name, run config) of the main student and each variant, in table order."""
    return [(c.report.label, c)] + [(name, variant_config(c, name)) for name in c.experiment.variants]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, paths: bool = False) -> Config:
    """Read a TOML/JSON config (default: the embedded default), apply overrides, validate everything
    (with `paths`, also that every input file exists, the output dir is writable and the environment fits)."""
    from engine.config.preflight import check_environment, check_paths

    problems: list[str] = []
    data = read_file(Path(path) if path else DEFAULT_CONFIG, problems)
    for assignment in overrides or []:
        apply_override(data, assignment, problems)
    config = from_dict(Config, data, "", problems)
    _resolve_defaults(config, data)
    problems.extend(validate(config))
    if paths:
        problems.extend(check_paths(config))
        problems.extend(check_environment(config))
        if not problems:  # each variant's own inputs (a variant may swap teachers, prompts or the model)
            for name in config.experiment.variants:
                v = variant_config(config, name)
                problems.extend(f"experiment.variants.{name!r}: {q}" for q in check_paths(v) + check_environment(v))
    if problems:
        raise ConfigError(problems)
    return config


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a raw dict (what a TOML file parses to)."""
    problems: list[str] = []
    config = from_dict(Config, data, "", problems)
    _resolve_defaults(config, data)
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config
