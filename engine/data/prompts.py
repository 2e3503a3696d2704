"""Prompt sets with task tags.

Formats: `.jsonl` lines `{"prompt": "...", "task": "geneval"}`; `.txt` lines `[task] prompt text` (untagged lines
get task `default`); `builtin:<name>` for the sets shipped with the engine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"^\s*\[([A-Za-z0-9_\-]+)\]\s*(.*)$")
DEFAULT_TASK = "default"


@dataclass(frozen=True)
class Prompt:
    """One prompt and its task tag (what hard routing keys on)."""
    text: str
    task: str


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
        return [parse_tagged(p) for p in world.train_prompts()]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    prompts: list[Prompt] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                prompts.append(Prompt(str(row["prompt"]), str(row.get("task", DEFAULT_TASK))))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' (and 'task'): {exc}") from exc
        else:
            prompts.append(parse_tagged(line))
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
