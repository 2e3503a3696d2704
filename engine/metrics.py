"""metrics.jsonl: one JSON object per logged optimizer step (rank 0).

Lines are appended with O_APPEND writes; a failed write (ENOSPC, EIO) keeps the unwritten bytes and retries them
before the next line, so a full disk costs no line and never tears one in the middle of the file. A line torn
by a kill can only be the last one; it is dropped when the run resumes. An unreadable line anywhere else is not
something this writer or a kill leaves: the file was damaged. On resume the writer then warns naming the file and
the line numbers, keeps the damaged file as `metrics.jsonl.damaged` (so nothing is silently lost), and goes on with
the readable lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from engine.files import write_atomic

log = logging.getLogger(__name__)


class MetricsWriter:
    """rank 0's metrics.jsonl: appended line by line, kept consistent with the checkpoints across kills."""

    def __init__(self, path: Path, resume_step: int = 0):
        """Open for appending; on resume, lines of steps >= `resume_step` (written after the checkpoint the run
        resumes from) are dropped so no step appears twice."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            rows, damaged = _parse(path)
            if damaged:
                copy = path.with_name(path.name + ".damaged")
                shutil.copyfile(path, copy)
                log.warning("%s: line(s) %s are unreadable and not the last line (a kill only tears the last one): "
                            "the file was damaged. Kept as %s; continuing with the %d readable lines", path,
                            ", ".join(map(str, damaged)), copy, len(rows))
            kept = [line for step, line in rows if step < resume_step]
            write_atomic(path, "".join(k + "\n" for k in kept))  # a kill here keeps the old file, never half
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending = b""

    def write(self, row: dict[str, Any]) -> None:
        """Append one step's row (non-finite floats as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._pending += (json.dumps(clean, sort_keys=True) + "\n").encode()
        self._flush()

    def flush(self) -> bool:
        """Retry unwritten bytes now; True when every line written so far is in the file."""
        self._flush()
        return not self._pending

    def _flush(self) -> None:
        try:
            while self._pending:
                written = os.write(self._fd, self._pending)
                self._pending = self._pending[written:]
        except OSError as exc:
            log.error("cannot write %s (%s); %d bytes kept in memory and retried with the next line",
                      self.path, exc, len(self._pending))

    def close(self) -> None:
        """Write what is pending and close the file."""
        if self._fd < 0:
            return
        self._flush()
        if self._pending:
            log.error("%s: %d bytes of metrics could not be written (%s)", self.path, len(self._pending),
                      "disk full?")
        os.close(self._fd)
        self._fd = -1


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _parse(path: Path) -> tuple[list[tuple[int, str]], list[int]]:
    """((step, line) of every readable row, 1-based numbers of unreadable lines other than a torn last one)."""
    lines = path.read_text(errors="replace").splitlines()
    rows, damaged = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), line))
        except (ValueError, TypeError, KeyError):
            if number < len(lines) and line.strip():
                damaged.append(number)
    return rows, damaged


def logged_steps(path: str | Path) -> list[int]:
    """The steps of a metrics.jsonl's readable lines ([] when there is no file)."""
    path = Path(path)
    return [step for step, _ in _parse(path)[0]] if path.is_file() else []
