"""Typed run configuration: nested dataclasses, TOML files, `--set a.b=v` overrides, validation.

Every field has a docstring (the README's config reference is generated from them by
`python -m engine.config --reference`). Loading never stops at the first problem: `load_config` collects
every unknown key (with the valid ones), wrong type and impossible value, and raises one `ConfigError`
listing all of them before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models.lora import DEFAULT_TARGETS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy.toml"

LOSSES = ("mse", "gkd", "kl_only")
ROUTINGS = ("task", "step", "epoch")
QUERY_BIAS = ("uniform", "low", "mid", "high")
SAMPLERS = ("sde", "ode")
MERGES = ("none", "average", "svd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "triton", "cuda")
ATTENTION = ("reference", "fused")
ATTENTION_BACKENDS = ("sdpa", "flash", "xformers")
FIELD_EVALUATORS = ("reference", "batched")
LORA_INITS = ("gaussian", "default", "zeros")
RESERVED_NAMES = ("base", "student")


TOY_PREFIX = "toy:"
TOY_WEIGHTS = REPO_ROOT / "engine" / "toy" / "weights"


def resolve_path(path: str) -> Path:
    """A config path as a filesystem path: `toy:<rel>` names a file of the shipped miniature world
    (engine/toy/weights/<rel>), so the embedded default runs from any working directory."""
    if path.startswith(TOY_PREFIX):
        return TOY_WEIGHTS / path[len(TOY_PREFIX):]
    return Path(path)


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named architecture built with random init when `path` is empty: `tiny` or `sd35-medium`."""
    path: str = ""
    """Local diffusers-format transformer dir (config.json + weights), or a pipeline dir with `transformer/`."""
    init_seed: int = 0
    """Seed of the random init of a preset model (ignored when loading `path`)."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    latent_size: int = 0
    """Latent height = width; 0 = the preset's default (SD3: pixel size / 8, e.g. 64 at 512 px)."""
    attention: str = "reference"
    """Joint-attention implementation: reference (diffusers + peft) or fused (LoRA-fused processor)."""
    attention_backend: str = "sdpa"
    """Attention kernel of the fused processor: sdpa, flash (flash-attn), xformers; falls back to sdpa."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in the student's backward to save activation memory."""


@dataclass
class LoraConfig:
    rank: int = 32
    """LoRA rank r of the student adapter."""
    alpha: float = 64.0
    """LoRA alpha; the adapter's update is scaled by alpha / r."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module names (suffixes) the adapter wraps; default: the 8 attention projections."""
    init: str = "gaussian"
    """peft init of the student: gaussian (A ~ N(0, 1/r), B = 0), default (Kaiming A, B = 0), zeros."""


@dataclass
class TeacherConfig:
    name: str = ""
    """Adapter name, referenced by `fields[].source` and `init.teachers`."""
    path: str = ""
    """PEFT adapter dir (adapter_config.json + adapter_model.safetensors) or a diffusers LoRA file/dir."""
    alpha: float = 0.0
    """Override lora_alpha; required for diffusers files that carry no alpha metadata. 0 = from the file."""
    random_seed: int = -1
    """>= 0: instead of loading, a random non-zero stand-in adapter with this seed (tests, `tiny` preset)."""
    rank: int = 8
    """Rank of a random stand-in adapter (loaded adapters take their rank from the file)."""


@dataclass
class FieldConfig:
    name: str = ""
    """Field name, referenced by `opd.routes`, `opd.weights` and `opd.anchor`."""
    source: str = "base"
    """`base` (adapters disabled) or a teacher name."""
    cfg_scale: float = 1.0
    """Guidance scale of the field's CFG operator v_u + g (v_c - v_u); 1.0 = plain conditional velocity."""


@dataclass
class InitConfig:
    merge: str = "none"
    """Cold start of the student: none, average (reference: mean of A and of B), svd (exact rank-r merge)."""
    teachers: list[str] = field(default_factory=list)
    """Teachers to merge; empty = all teachers."""
    weights: list[float] = field(default_factory=list)
    """Merge weights per teacher; empty = 1/K each."""
    adapter: str = ""
    """Initialise the student from this adapter (PEFT dir or diffusers file) instead, e.g. an SFT result."""


@dataclass
class DataConfig:
    prompts: str = "builtin:tiny"
    """Prompt set: `builtin:<name>` or a .jsonl ({"prompt": ..., "task": ...}) / .txt (`[task] text`) file."""
    encoder: str = "builtin"
    """Text encoder: builtin (deterministic hash encoder), toy (the miniature world's), or a local SD3
    pipeline dir (its CLIP-L, CLIP-G and T5 encoders)."""
    cache: str = ""
    """Prompt-embedding cache (safetensors); empty = `<output_dir>/prompt_cache.safetensors`."""
    max_sequence_length: int = 256
    """T5 tokens for the SD3 encoders (77 CLIP + this many T5 tokens per prompt)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Task tag -> sampling weight (every task of the prompt set needs one; 0 leaves a task out); empty = every
    prompt equally likely, so tasks count by their number of prompts. Equal weights balance the tasks."""


@dataclass
class RolloutConfig:
    steps: int = 10
    """Denoising steps of the student's rollout (>= 2)."""
    shift: float = 3.0
    """Schedule shift of FlowMatchEulerDiscreteScheduler."""
    sampler: str = "sde"
    """sde (Flow-GRPO SDE with log-probs, Flow-OPD) or ode (deterministic Euler, DanceOPD)."""
    noise_level: float = 0.7
    """SDE noise level a; s = a sqrt(sigma / (1 - sigma))."""
    cfg_scale: float = 1.0
    """Guidance scale of the student's own rollout (Flow-OPD 4.5, DanceOPD 1.0 = unguided)."""
    group_size: int = 1
    """Images per prompt."""


@dataclass
class OPDConfig:
    loss: str = "gkd"
    """mse (DanceOPD velocity MSE), gkd (Flow-OPD transition KL), kl_only (Flow-OPD clipped-ratio objective)."""
    routing: str = "task"
    """task (hard per sample by task tag), step (one field per optimizer step, drawn by `weights`),
    epoch (per-epoch alternation by dataset/task; `epoch_steps` steps each)."""
    routes: dict[str, str] = field(default_factory=dict)
    """task tag -> field name (routing task/epoch)."""
    weights: dict[str, float] = field(default_factory=dict)
    """field name -> sampling weight (routing step)."""
    epoch_steps: int = 10
    """Optimizer steps per epoch for routing = epoch."""
    anchor: str = ""
    """Field of the MAR anchor term (e.g. the base); empty = no anchor."""
    beta: float = 0.04
    """Weight of the anchor term."""
    query_states: int = 0
    """States per sample that the student is trained on: 0 = dense (every state but the last), else k."""
    query_bias: str = "uniform"
    """Where k states are drawn over the high->low-noise order: uniform, low (Beta(5,2), DanceOPD),
    mid (Beta(3,3)), high (Beta(2,5))."""
    student_cfg: float = 1.0
    """Guidance applied to the student's velocity in the loss (Flow-OPD: both sides guided, 4.5)."""
    clip_range: float = 1e-4
    """PPO ratio clip of kl_only."""
    adv_clip: float = 5.0
    """Advantage clamp of kl_only: A = clamp(-kl, -adv_clip, adv_clip)."""
    evaluator: str = "reference"
    """Field evaluation: reference (one forward per field, peft adapters switched) or batched (one forward)."""


@dataclass
class TrainConfig:
    steps: int = 20
    """Optimizer steps."""
    prompts_per_step: int = 2
    """Prompts per rank per micro-batch (x group_size images)."""
    grad_accum: int = 1
    """Rollout micro-batches per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warmup steps (then constant)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Seed of data order, routing, noise and query draws (each a pure function of seed and step)."""
    deepspeed: str = "configs/ds_zero2.json"
    """DeepSpeed JSON (ZeRO stage, comm); batch sizes, clipping and precision are filled in from here."""
    save_every: int = 10
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    max_nonfinite: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    profile_steps: str = ""
    """`A:B`: bracket optimizer steps [A, B) with cudaProfilerStart/Stop for nsys --capture-range."""


@dataclass
class KernelsConfig:
    sde_step: str = "auto"
    """Backend of the SDE/ODE step: auto, torch (reference), triton, cuda."""
    default: str = "auto"
    """Backend of every other op."""
    cuda_graphs: bool = False
    """Roll out with `RolloutRunner`: each step (student forward + fused SDE/ODE step) captured once as a CUDA
    graph and replayed (eager on CPU or when capture fails). SDE step noise then comes from the in-kernel Philox
    stream, still keyed by (seed, sample id, step); switching this in a run changes the SDE noise."""


@dataclass
class ReportConfig:
    enabled: bool = False
    """At the end, score every model of the miniature world (needs `model.path = "toy:base"` or another toy-world
    base): base, each teacher, both merges, this student and each variant; writes report.md/.json, samples.png and
    rewards.png into output_dir."""
    label: str = "OPD student"
    """This run's row name in the table."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """Row name -> `--set` overrides on top of this config: each is another student trained after this one (in
    `<output_dir>/variants/<name as a slug>`, resumable like the main run) and scored in the same table."""
    eval_every: int = 0
    """Score the student on the quick eval subset every N optimizer steps (rewards.jsonl, the reward curves);
    0 = only the final table."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Noise seeds of the final table (mean +- std over them; engine.eval's fixed per-sample noise)."""
    samples_per_prompt: int = 4
    """Samples per eval prompt in the final table (the quick curve subset uses 2 per every other prompt)."""
    parallel: bool = True
    """Single-process CPU runs: train the variants in child processes beside this run, the cores split between
    them (multi-rank and GPU runs train them one after another)."""


@dataclass
class Config:
    output_dir: str = "out/run"
    """Run directory: checkpoints, metrics.jsonl, config.toml, export/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    student: LoraConfig = field(default_factory=LoraConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    fields: list[FieldConfig] = field(default_factory=list)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


# --------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{args}]"


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """`value` as type `tp` (dataclasses recursively); appends to `problems` and returns None on failure."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {type(value).__name__} {value!r}")
            return None
        return _from_dict(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
            return None
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table ({_type_name(tp)}), got {type(value).__name__} {value!r}")
            return None
        return {str(k): _convert(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def _from_dict(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            prefix = f"{where}." if where else ""
            problems.append(f"unknown key '{prefix}{key}'; valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            converted = _convert(data[name], hints[name], f"{where}.{name}" if where else name, problems)
            if converted is not None:
                kwargs[name] = converted
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A `--set` value: a TOML literal (1, 2.5, true, "x", [1, 2], {a = 1}) or else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _split_assignment(assignment: str) -> tuple[str, str]:
    """`a."b=c".d=v` -> (`a."b=c".d`, `v`): the first `=` outside double quotes."""
    quoted = False
    for i, ch in enumerate(assignment):
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted:
            return assignment[:i], assignment[i + 1:]
    return assignment, ""


def _key_parts(key: str) -> list[str]:
    """A dotted key with TOML-style quoted parts: `report.variants."DanceOPD (v2.1)"` -> 3 parts."""
    import re

    parts = re.findall(r'\s*(?:"([^"]*)"|([^."\s]+))\s*(?:\.|$)', key.strip())
    joined = ".".join(f'"{q}"' if q else b for q, b in parts)
    return [q or b for q, b in parts] if joined == re.sub(r"\s*\.\s*", ".", key.strip()) else []


def apply_override(data: dict, assignment: str, problems: list[str]) -> None:
    """Apply `a.b.c=value` (list items by index: `teachers.0.path=...`) to the raw dict `data`."""
    if "=" not in assignment:
        problems.append(f"--set {assignment!r}: expected key=value")
        return
    key, text = _split_assignment(assignment)
    parts = _key_parts(key)
    if not parts:
        problems.append(f"--set {assignment!r}: cannot parse the key {key.strip()!r}")
        return
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                problems.append(f"--set {key}: no list item {part!r} (length {len(node)})")
                return
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
    last = parts[-1]
    value = _parse_scalar(text.strip())
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            problems.append(f"--set {key}: no list item {last!r} (length {len(node)})")
            return
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value


def _read_file(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        problems.append(f"config file not found: {path}")
        return {}
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"cannot parse {path}: {exc}")
        return {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, paths: bool = False) -> Config:
    """Read a TOML/JSON config (default: the embedded default), apply overrides, validate everything
    (with `paths`, also that every input file exists and the output dir is writable)."""
    problems: list[str] = []
    data = _read_file(Path(path) if path else DEFAULT_CONFIG, problems)
    for assignment in overrides or []:
        apply_override(data, assignment, problems)
    config = _from_dict(Config, data, "", problems)
    problems.extend(validate(config))
    if paths:
        problems.extend(check_paths(config))
        problems.extend(check_environment(config))
        if not problems:  # each variant's own inputs (a variant may swap teachers, prompts or the model)
            for name in config.report.variants:
                v = variant_config(config, name)
                problems.extend(f"report.variants.{name!r}: {q}" for q in check_paths(v) + check_environment(v))
    if problems:
        raise ConfigError(problems)
    return config


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a raw dict (what a TOML file parses to)."""
    problems: list[str] = []
    config = _from_dict(Config, data, "", problems)
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


# ------------------------------------------------------------------------------------------ validation


def _choice(problems: list[str], where: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        problems.append(f"{where} = {value!r}; valid: {', '.join(valid)}")


def validate(c: Config) -> list[str]:
    """Every impossible value and dangling reference in `c` (empty list when valid)."""
    from engine.models.presets import PRESETS

    p: list[str] = []
    if not c.output_dir:
        p.append("output_dir is empty")
    m = c.model
    if not m.path and m.preset not in PRESETS:
        p.append(f"model.preset = {m.preset!r}; valid: {', '.join(sorted(PRESETS))} (or set model.path)")
    _choice(p, "model.dtype", m.dtype, DTYPES)
    _choice(p, "model.attention", m.attention, ATTENTION)
    _choice(p, "model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    if m.latent_size < 0 or m.latent_size % 2:
        p.append(f"model.latent_size = {m.latent_size}; must be 0 (preset default) or a positive even number")
    elif not m.path and m.preset in PRESETS:
        p.extend(_latent_fits(m.latent_size, PRESETS[m.preset].transformer, f"preset {m.preset!r}"))

    s = c.student
    if s.rank <= 0:
        p.append(f"student.rank = {s.rank}; must be > 0")
    if s.alpha <= 0:
        p.append(f"student.alpha = {s.alpha}; must be > 0")
    if not s.targets:
        p.append("student.targets is empty")
    _choice(p, "student.init", s.init, LORA_INITS)

    teacher_names: list[str] = []
    for i, t in enumerate(c.teachers):
        where = f"teachers[{i}]"
        if not t.name:
            p.append(f"{where}.name is empty")
        elif t.name in RESERVED_NAMES:
            p.append(f"{where}.name = {t.name!r} is reserved ({', '.join(RESERVED_NAMES)})")
        elif t.name in teacher_names:
            p.append(f"{where}.name = {t.name!r} is used twice (also teachers[{teacher_names.index(t.name)}].name)")
        teacher_names.append(t.name)
        if bool(t.path) == (t.random_seed >= 0):
            p.append(f"{where} ({t.name}): set exactly one of `path` or `random_seed`")
        if t.rank <= 0:
            p.append(f"{where}.rank = {t.rank}; must be > 0")
        if t.alpha < 0:
            p.append(f"{where}.alpha = {t.alpha}; must be >= 0 (0 = from the file)")

    field_names: list[str] = []
    for i, f in enumerate(c.fields):
        where = f"fields[{i}]"
        if not f.name:
            p.append(f"{where}.name is empty")
        elif f.name in field_names:
            p.append(f"{where}.name = {f.name!r} is used twice (also fields[{field_names.index(f.name)}].name)")
        elif f.name == "student":
            p.append(f"{where}.name = 'student' is reserved")
        field_names.append(f.name)
        if f.source != "base" and f.source not in teacher_names:
            p.append(f"{where}.source = {f.source!r}; valid: base, {', '.join(teacher_names) or '(no teachers)'}")
        if f.cfg_scale < 0:
            p.append(f"{where}.cfg_scale = {f.cfg_scale}; must be >= 0")

    ini = c.init
    _choice(p, "init.merge", ini.merge, MERGES)
    for name in ini.teachers:
        if name not in teacher_names:
            p.append(f"init.teachers: unknown teacher {name!r}; valid: {', '.join(teacher_names) or '(none)'}")
    n_merge = len(ini.teachers) or len(teacher_names)
    if ini.merge != "none" and n_merge == 0:
        p.append(f"init.merge = {ini.merge!r} needs teachers")
    if ini.weights and len(ini.weights) != n_merge:
        p.append(f"init.weights has {len(ini.weights)} entries for {n_merge} merged teachers")
    if ini.merge != "none" and ini.adapter:
        p.append("init: set either `merge` or `adapter`, not both")
    if ini.merge == "average":  # loaded teachers' ranks are checked when they are loaded
        merged = [t for t in c.teachers if t.random_seed >= 0 and (not ini.teachers or t.name in ini.teachers)]
        off = [f"{t.name} (rank {t.rank})" for t in merged if t.rank != s.rank]
        if off:
            p.append(f"init.merge = 'average' averages A and B, so merged teachers need student.rank = {s.rank}: "
                     f"{', '.join(off)}; use init.merge = 'svd'")

    d = c.data
    if not d.prompts:
        p.append("data.prompts is empty")
    if d.max_sequence_length <= 0:
        p.append(f"data.max_sequence_length = {d.max_sequence_length}; must be > 0")
    for task, w in d.task_weights.items():
        if w < 0:
            p.append(f"data.task_weights.{task} = {w}; must be >= 0")
    if d.task_weights and all(w <= 0 for w in d.task_weights.values()):
        p.append("data.task_weights: every weight is 0; give at least one task a positive weight")

    r = c.rollout
    if r.steps < 2:
        p.append(f"rollout.steps = {r.steps}; must be >= 2")
    if r.shift <= 0:
        p.append(f"rollout.shift = {r.shift}; must be > 0")
    _choice(p, "rollout.sampler", r.sampler, SAMPLERS)
    if r.sampler == "sde" and r.noise_level <= 0:
        p.append(f"rollout.noise_level = {r.noise_level}; must be > 0 for the sde sampler")
    if r.cfg_scale < 0:
        p.append(f"rollout.cfg_scale = {r.cfg_scale}; must be >= 0")
    if r.group_size < 1:
        p.append(f"rollout.group_size = {r.group_size}; must be >= 1")

    o = c.opd
    _choice(p, "opd.loss", o.loss, LOSSES)
    _choice(p, "opd.routing", o.routing, ROUTINGS)
    _choice(p, "opd.query_bias", o.query_bias, QUERY_BIAS)
    _choice(p, "opd.evaluator", o.evaluator, FIELD_EVALUATORS)
    if not field_names:
        p.append("fields is empty: define at least one field to distill from")
    for task, name in o.routes.items():
        if name not in field_names:
            p.append(f"opd.routes.{task} = {name!r}: unknown field; valid: {', '.join(field_names) or '(none)'}")
    for name, w in o.weights.items():
        if name not in field_names:
            p.append(f"opd.weights.{name}: unknown field; valid: {', '.join(field_names) or '(none)'}")
        if w < 0:
            p.append(f"opd.weights.{name} = {w}; must be >= 0")
    if o.routing in ("task", "epoch") and not o.routes:
        p.append(f"opd.routing = {o.routing!r} needs opd.routes (task -> field)")
    if o.routing == "step" and (not o.weights or sum(o.weights.values()) <= 0):
        p.append("opd.routing = 'step' needs opd.weights with a positive sum")
    if o.epoch_steps < 1:
        p.append(f"opd.epoch_steps = {o.epoch_steps}; must be >= 1")
    if o.anchor and o.anchor not in field_names:
        p.append(f"opd.anchor = {o.anchor!r}: unknown field; valid: {', '.join(field_names) or '(none)'}")
    if o.beta < 0:
        p.append(f"opd.beta = {o.beta}; must be >= 0")
    if o.query_states < 0 or o.query_states > max(r.steps - 1, 1):
        p.append(f"opd.query_states = {o.query_states}; must be 0 (dense) or 1..{max(r.steps - 1, 1)}")
    if o.student_cfg < 0:
        p.append(f"opd.student_cfg = {o.student_cfg}; must be >= 0")
    if o.clip_range <= 0:
        p.append(f"opd.clip_range = {o.clip_range}; must be > 0")
    if o.adv_clip <= 0:
        p.append(f"opd.adv_clip = {o.adv_clip}; must be > 0")
    if o.loss == "kl_only" and r.sampler != "sde":
        p.append("opd.loss = 'kl_only' needs rollout.sampler = 'sde' (it re-scores the rollout's log-probs)")
    if o.loss in ("gkd", "kl_only") and r.noise_level <= 0:
        p.append(f"opd.loss = {o.loss!r} needs rollout.noise_level > 0 (the KL divides by s^2)")

    t = c.train
    for key in ("steps", "prompts_per_step", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            p.append(f"train.{key} = {getattr(t, key)}; must be >= 1")
    if t.lr <= 0:
        p.append(f"train.lr = {t.lr}; must be > 0")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay = {t.weight_decay}; must be >= 0")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        p.append(f"train.betas = {t.betas}; must be two numbers in [0, 1)")
    if t.eps <= 0:
        p.append(f"train.eps = {t.eps}; must be > 0")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps = {t.warmup_steps}; must be >= 0")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip = {t.grad_clip}; must be >= 0")
    if t.save_every < 0:
        p.append(f"train.save_every = {t.save_every}; must be >= 0")
    if t.keep_checkpoints < 1:
        p.append(f"train.keep_checkpoints = {t.keep_checkpoints}; must be >= 1")
    if t.max_nonfinite < 1:
        p.append(f"train.max_nonfinite = {t.max_nonfinite}; must be >= 1")
    if t.profile_steps:
        try:
            a, b = (int(x) for x in t.profile_steps.split(":"))
            if not 0 <= a < b:
                raise ValueError
        except ValueError:
            p.append(f"train.profile_steps = {t.profile_steps!r}; expected 'A:B' with 0 <= A < B")

    k = c.kernels
    _choice(p, "kernels.sde_step", k.sde_step, BACKENDS)
    _choice(p, "kernels.default", k.default, BACKENDS)
    p.extend(_validate_report(c))
    return p


def _validate_report(c: Config) -> list[str]:
    rep = c.report
    p: list[str] = []
    if (rep.enabled or rep.eval_every) and c.data.encoder != "toy":
        p.append(f"report.enabled / report.eval_every score the miniature world's eval prompts with its rewards, so "
                 f"they need data.encoder = 'toy' (got {c.data.encoder!r})")
    if rep.eval_every < 0:
        p.append(f"report.eval_every = {rep.eval_every}; must be >= 0")
    if rep.samples_per_prompt < 1:
        p.append(f"report.samples_per_prompt = {rep.samples_per_prompt}; must be >= 1")
    if not rep.seeds:
        p.append("report.seeds is empty")
    if rep.variants and not rep.enabled:
        p.append("report.variants are trained for the report's table: set report.enabled = true")
    if rep.label in rep.variants:
        p.append(f"report.variants.{rep.label!r}: the same name as report.label")
    dirs: dict[str, str] = {}
    for name, overrides in rep.variants.items():
        bad = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in ("output_dir", "report")]
        if bad:
            p.append(f"report.variants.{name!r}: {bad} cannot be overridden in a variant (it runs in "
                     f"<output_dir>/variants/<name> and has no report of its own)")
            continue
        slug = variant_dir_name(name)
        if slug in dirs:
            p.append(f"report.variants.{name!r} and {dirs[slug]!r} map to the same directory variants/{slug}")
        dirs[slug] = name
        try:
            variant_config(c, name)
        except ConfigError as exc:
            p.extend(f"report.variants.{name!r}: {q}" for q in exc.problems)
    return p


def variant_dir_name(name: str) -> str:
    """`OPD student (DanceOPD, MSE)` -> `opd-student-danceopd-mse`: the variant's run dir under variants/."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"


def variant_config(c: Config, name: str) -> Config:
    """The report variant `name`: `c` with the variant's overrides, run in `<output_dir>/variants/<dir>`, without
    variants or a report table of its own (its reward curve is kept). Raises ConfigError listing every problem."""
    problems: list[str] = []
    data = dataclasses.asdict(c)
    for assignment in c.report.variants[name]:
        apply_override(data, assignment, problems)
    data["output_dir"] = str(Path(c.output_dir) / "variants" / variant_dir_name(name))
    data["report"] = {**data["report"], "enabled": False, "variants": {}, "label": name}
    config = _from_dict(Config, data, "", problems)
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


def _latent_fits(latent_size: int, transformer: dict, what: str) -> list[str]:
    """SD3's positional embedding covers pos_embed_max_size patches per side (measured: latent 18 on `tiny`,
    max 8 x patch 2 = 16, fails at the first forward with "Height (9) cannot be greater than pos_embed_max_size")."""
    limit = int(transformer.get("pos_embed_max_size") or 0) * int(transformer.get("patch_size", 1))
    if latent_size and limit and latent_size > limit:
        return [f"model.latent_size = {latent_size}; {what} supports at most {limit} (pos_embed_max_size x patch_size)"]
    return []


def check_environment(c: Config) -> list[str]:
    """What only this machine and the inputs can tell, checked before any heavy work: optional modules, the
    device's dtypes, the prompts against the routes, the student's target modules against the model."""
    import importlib.util

    p: list[str] = []
    if c.opd.evaluator == "batched" and importlib.util.find_spec("engine.models.multi_lora") is None:
        p.append("opd.evaluator = 'batched' is not available in this build (no engine.models.multi_lora)")
    if c.model.attention == "fused" and importlib.util.find_spec("engine.models.attention") is None:
        p.append("model.attention = 'fused' is not available in this build (no engine.models.attention)")
    if c.model.dtype == "float16":
        import torch

        if not torch.cuda.is_available():
            p.append("model.dtype = 'float16' needs a CUDA device (DeepSpeed has no fp16 on CPU); use bfloat16 "
                     "or float32")
    ds = Path(c.train.deepspeed)
    ds = ds if ds.is_file() else REPO_ROOT / ds
    if ds.is_file():
        try:
            if not isinstance(json.loads(ds.read_text()), dict):
                raise ValueError("expected a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            p.append(f"train.deepspeed: cannot parse {ds}: {exc}")
    p.extend(_check_prompts(c))
    p.extend(_check_targets(c))
    return p


def _check_prompts(c: Config) -> list[str]:
    from engine.data.prompts import load_prompts

    if not c.data.prompts or (not c.data.prompts.startswith("builtin:") and not Path(c.data.prompts).is_file()):
        return []  # reported by validate / check_paths
    try:
        tasks = sorted({q.task for q in load_prompts(c.data.prompts)})
    except (ValueError, ImportError, OSError) as exc:
        return [f"data.prompts = {c.data.prompts!r}: {exc}"]
    if c.data.task_weights:
        from engine.data.sampler import weighted_pool

        try:
            weighted_pool(load_prompts(c.data.prompts), c.data.task_weights)
        except ValueError as exc:
            return [str(exc)]
        if unknown := sorted(set(c.data.task_weights) - set(tasks)):
            return [f"data.task_weights: task(s) {unknown} have no prompts in data.prompts (tasks: {tasks})"]
    o = c.opd
    if o.routing == "task" and o.routes and (unrouted := [t for t in tasks if t not in o.routes]):
        return [f"opd.routes has no field for task(s) {unrouted} of data.prompts (routes: {sorted(o.routes)})"]
    if o.routing == "epoch" and o.routes and not set(tasks) & set(o.routes):
        return [f"opd.routes: no task of data.prompts ({tasks}) has a route, so routing = 'epoch' has nothing to "
                f"train on"]
    return []


def _check_targets(c: Config) -> list[str]:
    """Each student target must name a Linear layer of the model (peft's rule: the module's name is the target or
    ends with '.' + target); the model is built on the meta device (no memory, ~0.5 s for SD3.5-M)."""
    from engine.models.presets import PRESETS

    if c.model.path:
        model_dir = resolve_path(c.model.path)
        cfg_file = next((d / "config.json" for d in (model_dir, model_dir / "transformer")
                         if (d / "config.json").is_file()), None)
        try:
            transformer = json.loads(cfg_file.read_text()) if cfg_file else None
        except (OSError, ValueError):
            transformer = None  # the loader reports it, naming the file
        if transformer is None:
            return []
        transformer = {k: v for k, v in transformer.items() if not k.startswith("_")}
        problems = _latent_fits(c.model.latent_size, transformer, str(cfg_file))
    elif c.model.preset in PRESETS:
        transformer, problems = PRESETS[c.model.preset].transformer, []
    else:
        return []
    if not c.student.targets:
        return problems
    import torch
    from diffusers import SD3Transformer2DModel

    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**transformer)
    except (TypeError, ValueError) as exc:
        return [*problems, f"model: cannot build the transformer from its config: {exc}"]
    linear = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    missing = [t for t in c.student.targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        problems.append(f"student.targets: {missing} match no Linear layer of the model (e.g. to_q, to_k, to_v, "
                        f"to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, ff.net.0.proj)")
    return problems


def check_paths(c: Config) -> list[str]:
    """Every file/dir the run will read that does not exist, found before any heavy work starts."""
    p: list[str] = []

    def need(where: str, path: str, kind: str = "path") -> None:
        if path and not resolve_path(path).exists():
            p.append(f"{where}: {kind} not found: {path}")

    need("model.path", c.model.path, "model dir")
    for i, t in enumerate(c.teachers):
        need(f"teachers[{i}].path ({t.name})", t.path, "adapter")
    need("init.adapter", c.init.adapter, "adapter")
    if not c.data.prompts.startswith("builtin:"):
        need("data.prompts", c.data.prompts, "prompt file")
    if c.data.encoder not in ("builtin", "toy"):
        need("data.encoder", c.data.encoder, "SD3 pipeline dir")
    ds = Path(c.train.deepspeed)
    if not ds.is_file() and not (REPO_ROOT / ds).is_file():
        p.append(f"train.deepspeed: DeepSpeed config not found: {c.train.deepspeed}")
    out = Path(c.output_dir)
    existing = next((q for q in [out, *out.parents] if q.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        p.append(f"output_dir: {existing} is not a writable directory")
    return p


# ------------------------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: Config) -> str:
    """The config as TOML that `load_config` reads back to an equal Config."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    arrays: list[tuple[str, list]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            arrays.append((f.name, value))
        elif isinstance(value, list) and f.name in ("teachers", "fields"):
            continue
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, value in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(value).items()]
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(item).items()]
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """Markdown reference of every config key with its type, default and docstring."""
    import ast
    import inspect

    out: list[str] = [
        "# Config reference",
        "",
        "Generated by `python -m engine.config --reference > docs/config.md` (tests/test_docs.py checks it is",
        "current): every key, its type, default and meaning. Files are TOML; `--set key.sub=value` overrides any",
        "key (list items by index: `--set teachers.0.path=/x`). Unknown keys, wrong types and impossible values",
        "are all reported at once before any work starts.",
        "",
    ]

    def docs(cls: type) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        result: dict[str, str] = {}
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                result[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
        return result

    sections = [("(top level)", Config), ("[model]", ModelConfig), ("[student]", LoraConfig),
                ("[[teachers]]", TeacherConfig), ("[[fields]]", FieldConfig), ("[init]", InitConfig),
                ("[data]", DataConfig), ("[rollout]", RolloutConfig), ("[opd]", OPDConfig),
                ("[train]", TrainConfig), ("[kernels]", KernelsConfig),
                ("[report]", ReportConfig)]
    for title, cls in sections:
        out += [f"#### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        d = docs(cls)
        default_obj = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) or (typing.get_origin(tp) is list and
                                                 dataclasses.is_dataclass(typing.get_args(tp)[0])):
                continue
            default = getattr(default_obj, f.name)
            out.append(f"| `{f.name}` | {_type_name(tp)} | `{_toml_value(default)}` | {d.get(f.name, '')} |")
        out.append("")
    return "\n".join(out)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--reference"]:
        print(reference_markdown())
        return 0
    path = argv[0] if argv else None
    print(to_toml(load_config(path, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

