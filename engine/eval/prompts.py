"""Evaluation prompt sets, read as they are published: each prompt with its task and its metadata row.

- GenEval `*_metadata.jsonl` (Flow-OPD `dataset/geneval/test_metadata.jsonl`, the official
  `prompts/evaluation_metadata.jsonl`): one JSON object a line with `prompt`, `tag`, `include` (and `exclude`); the
  whole row is the metadata the geneval scorer reads; task `geneval`.
- other `.jsonl`: {"prompt": ..., "task": ...} (the training format), any other keys kept as metadata.
- `.txt`: one prompt a line (Flow-OPD `dataset/ocr/test.txt`, `dataset/pickscore/test.txt`); `[task] text` lines
  take their tag as the task, as in training; other lines get task `default`.
- `builtin:<name>`: the engine's or a miniature world's prompt set (engine.data.prompts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.prompts import DEFAULT_TASK, load_prompts, parse_tagged

GENEVAL_TASK = "geneval"


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: the text the encoder sees, its task, and the metadata scorers read."""
    text: str
    task: str
    metadata: dict[str, Any] = field(default_factory=dict)


def from_lines(lines: list[str]) -> list[EvalPrompt]:
    """`[task] text` / plain prompt lines as EvalPrompts."""
    return [EvalPrompt(p.text, p.task, {"task": p.task}) for p in map(parse_tagged, lines) if p.text]


def load_eval_prompts(spec: str, limit: int = 0) -> list[EvalPrompt]:
    """The prompt set `spec` (module docstring), its first `limit` prompts when > 0; ValueError naming the file
    and line for bad input."""
    if spec.startswith("builtin:"):
        prompts = [EvalPrompt(p.text, p.task, {"task": p.task}) for p in load_prompts(spec)]
        return prompts[:limit] if limit else prompts
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        out = from_lines(lines)
    else:
        out = []
        for lineno, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                text = str(row["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt': {exc}") from exc
            task = str(row.get("task") or (GENEVAL_TASK if "include" in row else DEFAULT_TASK))
            out.append(EvalPrompt(text, task, row))
    if not out:
        raise ValueError(f"prompt file {path} has no prompts")
    return out[:limit] if limit else out
