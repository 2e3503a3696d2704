"""Config files and overrides: TOML/JSON in, typed `Config` out (collecting every problem), `--set a.b=v`,
`to_toml` (the resolved config written into each run dir), config paths (`<world>:<rel>`), and the reference docs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from engine.config.eval_schema import TrackingConfig, ValidationConfig
from engine.config.rl_schema import RLConfig
from engine.config.schema import (
    Config,
    DataConfig,
    ExperimentConfig,
    FieldConfig,
    InitConfig,
    KernelsConfig,
    ModelConfig,
    OPDConfig,
    ReportConfig,
    RolloutConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_SCHEME = re.compile(r"^([a-z][a-z0-9_]*):(.*)$")


def resolve_path(path: str) -> Path:
    """A config path as a filesystem path: `<world>:<rel>` names a file shipped with a registered miniature world
    (e.g. `toy:base`; engine.worlds), so its configs run from any working directory; anything else is a path."""
    m = _SCHEME.match(path)
    if m:
        from engine.worlds import find_world

        world = find_world(m.group(1))
        if world is not None:
            return world.resolve(m.group(2))
    return Path(path)


def deepspeed_json(c: Config) -> Path:
    """The DeepSpeed JSON of `train.deepspeed` (relative paths also from the repository root)."""
    path = Path(c.train.deepspeed)
    return path if path.is_file() or path.is_absolute() else REPO_ROOT / path


# --------------------------------------------------------------------------------------------- parsing


def type_name(tp: Any) -> str:
    """`dict[str, float]`-style name of a type hint (for messages and the reference)."""
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(type_name(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{args}]"


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """`value` as type `tp` (dataclasses recursively); appends to `problems` and returns None on failure."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {type(value).__name__} {value!r}")
            return None
        return from_dict(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list ({type_name(tp)}), got {type(value).__name__} {value!r}")
            return None
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table ({type_name(tp)}), got {type(value).__name__} {value!r}")
            return None
        return {str(k): _convert(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -(1 << 63) <= value < 1 << 63:
                return value
            problems.append(f"{where} = {value}; does not fit in 64 bits (TOML integers are 64-bit signed)")
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def from_dict(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    """`cls` (a config dataclass) from a raw dict; unknown keys and wrong types are appended to `problems`."""
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
    """A dotted key with TOML-style quoted parts: `experiment.variants."DanceOPD (v2.1)"` -> 3 parts."""
    parts = re.findall(r'\s*(?:"([^"]*)"|([^."\s]+))\s*(?:\.|$)', key.strip())
    joined = ".".join(f'"{q}"' if q else b for q, b in parts)
    return [q or b for q, b in parts] if joined == re.sub(r"\s*\.\s*", ".", key.strip()) else []


def override_key(assignment: str) -> list[str]:
    """The key parts of a `--set` assignment ([] when it cannot be parsed)."""
    return _key_parts(_split_assignment(assignment)[0])


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
        if not isinstance(node, dict | list):  # e.g. `--set a=1 --set a.b=2`: `a` is a value, not a table
            problems.append(f"--set {key}: {'.'.join(parts[: i + 1])} = {node!r} is not a table")
            return
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


def read_file(path: Path, problems: list[str]) -> dict:
    """The raw dict of a TOML (or .json) config file; a missing or unparsable file is appended to `problems`."""
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


SECTIONS: list[tuple[str, type]] = [
    ("(top level)", Config), ("[model]", ModelConfig), ("[student]", StudentConfig), ("[[teachers]]", TeacherConfig),
    ("[[fields]]", FieldConfig), ("[init]", InitConfig), ("[data]", DataConfig), ("[rollout]", RolloutConfig),
    ("[opd]", OPDConfig), ("[train]", TrainConfig), ("[kernels]", KernelsConfig), ("[report]", ReportConfig),
    ("[experiment]", ExperimentConfig), ("[validation]", ValidationConfig), ("[tracking]", TrackingConfig),
    ("[rl]", RLConfig),
]


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

    for title, cls in SECTIONS:
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
            out.append(f"| `{f.name}` | {type_name(tp)} | `{_toml_value(default)}` | {d.get(f.name, '')} |")
        out.append("")
    return "\n".join(out)
