"""Prompt sets with task tags.

Formats: `.jsonl` lines `{"prompt": "...", "task": "geneval"}` (optionally `source_image` / `target_image`);
`.csv` with DanceOPD's columns `task,prompt,source_image,target_image` (engine/data/edits.py); `.txt` lines
`[task] prompt text` (untagged lines get task `default`); `builtin:<name>` for the sets shipped with the engine or
a miniature world's (which may be a prompt file of its own, e.g. edit rows with their source images).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"^\s*\[([A-Za-z0-9_\-]+)\]\s*(.*)$")
DEFAULT_TASK = "default"


@dataclass(frozen=True)
class Prompt:
    """One prompt and its task tag (what hard routing keys on); an edit row also names its source image."""
    text: str
    task: str
    source: str = ""
    """Path of the source image that conditions the row (an edit row); "" = text-to-image."""
    target: str = ""
    """Path of a target image (checked, not used by on-policy distillation); "" = none."""
    where: str = ""
    """`file:line` the row came from (error messages); "" for builtin sets."""


# Stand-in prompts for the `tiny` preset: two task families, so hard routing has something to route.
_BUILTIN: dict[str, list[str]] = {
    "tiny": [
        "[compose] a red square left of a blue circle",
        "[compose] two green triangles above a yellow square",
        "[compose] three blue circles in a row",
        "[compose] a purple square below an orange circle",
        "[text] the digit 3",
        "[text] the digit 7",
        "[text] the word ok",
        "[text] the digits 42",
    ],
}


def parse_tagged(line: str) -> Prompt:
    """`[task] text` -> Prompt(text, task); the tag stays part of the text the encoder sees."""
    m = _TAG.match(line)
    if m is None:
        return Prompt(line.strip(), DEFAULT_TASK)
    return Prompt(line.strip(), m.group(1))


CSV_COLUMNS = ("task", "prompt", "source_image", "target_image")
"""DanceOPD's column names (its configs: task_column / prompt_column / source_image_column / target_image_column)."""


def _clean(text: object) -> str:
    """DanceOPD's `_clean_prompt`: whitespace runs collapsed to one space (prompt_csv.py:119-120)."""
    return " ".join(str(text or "").split())


def _image_path(root: Path, value: object) -> str:
    """A path as DanceOPD resolves it: relative to the prompt file's directory, `~` expanded; "" when empty."""
    text = str(value or "").strip()
    if not text:
        return ""
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else root / path)


def read_csv(path: Path) -> list[Prompt]:
    """The rows of a DanceOPD prompt CSV, read as its loader reads them (danceopd/data/prompt_csv.py:132-173):
    `utf-8-sig`, whitespace in the prompt collapsed, an empty task is `default`, a row without a prompt skipped,
    image paths relative to the CSV's directory; ValueError naming the file when unreadable (a byte that is not
    UTF-8 included: DanceOPD opens with errors="replace" and would train on the mangled prompt)."""
    path = Path(path)
    root = path.resolve().parent
    csv.field_size_limit(2**31 - 1)  # DanceOPD's limit: caption_dict cells can be long
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise ValueError(f"{path}:1: a prompt CSV needs a 'prompt' column (DanceOPD's columns: "
                                 f"{', '.join(CSV_COLUMNS)}); got {reader.fieldnames}")
            rows = []
            for row in reader:
                prompt = _clean(row.get("prompt"))
                if not prompt:
                    continue
                rows.append(Prompt(prompt, _clean(row.get("task")) or DEFAULT_TASK,
                                   _image_path(root, row.get("source_image")),
                                   _image_path(root, row.get("target_image")), f"{path}:{reader.line_num}"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the prompt CSV: {exc}") from exc
    return rows


def jsonl_row(row: dict, path: Path, lineno: int) -> Prompt:
    """One jsonl line's row (`prompt` required; `task`, `source_image`, `target_image` optional)."""
    root = path.resolve().parent
    return Prompt(str(row["prompt"]), str(row.get("task", DEFAULT_TASK)), _image_path(root, row.get("source_image")),
                  _image_path(root, row.get("target_image")), f"{path}:{lineno}")


def load_prompts(spec: str) -> list[Prompt]:
    """Read a prompt set (see module docstring); raises ValueError naming the file on bad input."""
    if spec.startswith("builtin:"):
        from engine.worlds import find_world, world_names

        name = spec.split(":", 1)[1]
        if name in _BUILTIN:
            return [parse_tagged(p) for p in _BUILTIN[name]]
        world = find_world(name)  # a miniature world's training set (engine/worlds)
        if world is None:
            raise ValueError(f"unknown builtin prompt set {name!r}; valid: {sorted(_BUILTIN) + world_names()}")
        train = world.train_prompts()
        if isinstance(train, Path):  # a prompt file of the world's own (edit rows with their source images)
            return load_prompts(str(train))
        return [parse_tagged(p) for p in train]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    if path.suffix.lower() == ".csv":
        rows = read_csv(path)
        if not rows:
            raise ValueError(f"prompt file {path} has no prompts")
        return rows
    prompts: list[Prompt] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(jsonl_row(json.loads(line), path, lineno))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' (and 'task', "
                                 f"'source_image', 'target_image'): {exc}") from exc
        else:
            prompts.append(parse_tagged(line))
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
