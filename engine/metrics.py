"""metrics.jsonl: one JSON object per logged optimizer step (rank 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: Path, resume_step: int = 0):
        """Open for appending; on resume, lines of steps >= `resume_step` (written after the checkpoint the run
        resumes from) are dropped so no step appears twice."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", -1) < resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write
            path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._fh.write(json.dumps(clean, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
