"""Experiment trackers behind one small interface: TensorBoard by default, wandb when asked (imported lazily).

metrics.jsonl stays the source of truth; trackers get a copy of each logged row. Every point is logged at the
number of optimizer steps finished when it was measured (a metrics row of step index s at s + 1, a validation
after N steps at N, the step-0 validation at 0), so a run resumed from checkpoint k recomputes exactly the points
after k: TensorBoard's `purge_step = k + 1` hides the killed run's points from there on, and the resumed run
writes them again, one curve without duplicates. wandb cannot drop points: it ignores steps lower than the last
one it saw, so after a resume it keeps the killed run's values of the replayed steps (the same values: resume is
bit-exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TB_DIR = "tb"
SKIP = ("step", "data_crc")  # the row's index and its data checksum are not curves


class Tracker(Protocol):
    """Where scalars, images and text go."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars at `step`."""
        ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an HWC uint8 image at `step`."""
        ...

    def text(self, tag: str, text: str, step: int) -> None:
        """Log (markdown) text at `step`."""
        ...

    def flush(self) -> None:
        """Hand everything logged so far to the OS."""
        ...

    def close(self) -> None:
        """Flush and release."""
        ...


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (bools as 0/1), without the step index and the data checksum."""
    out = {}
    for k, v in row.items():
        if k in SKIP or isinstance(v, str | list | dict) or v is None:
            continue
        if isinstance(v, bool | int | float):
            out[k] = float(v)
    return out


class TensorBoardTracker:
    """torch.utils.tensorboard into `<run dir>/tb/`; on resume points from `purge_step` on are superseded."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step, flush_secs=60)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One add_scalar per value (NaN and inf are logged as they are)."""
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """add_image in HWC layout."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        """add_text (TensorBoard renders markdown)."""
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Write pending events to the event file."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbTracker:
    """wandb (offline by default: no network; `wandb sync` uploads later), one run id per run dir."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("tracking.wandb = true needs the wandb package (pip install wandb), or set "
                              "tracking.wandb = false") from exc
        from engine.files import write_atomic

        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            import uuid

            run_id = uuid.uuid4().hex[:12]
            write_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=project, dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                              name=run_dir.name, config=dict(config))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """run.log at `step` (non-finite values as None, which wandb skips)."""
        self.run.log({k: (v if math.isfinite(v) else None) for k, v in values.items()}, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """run.log of a wandb.Image."""
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Into the run summary (wandb has no per-step text panel)."""
        self.run.summary[tag] = text

    def flush(self) -> None:
        """wandb writes on its own thread; nothing to do."""

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


class Trackers:
    """Fan-out to every configured tracker (empty = nothing logged)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars everywhere."""
        for t in self.trackers:
            t.scalars(values, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an image everywhere."""
        for t in self.trackers:
            t.image(tag, image, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Log text everywhere."""
        for t in self.trackers:
            t.text(tag, text, step)

    def flush(self) -> None:
        """Flush every tracker."""
        for t in self.trackers:
            t.flush()

    def close(self) -> None:
        """Close every tracker."""
        for t in self.trackers:
            t.close()


def build_trackers(run_dir: Path, tensorboard: bool, wandb: bool, project: str, mode: str,
                   config: Mapping[str, Any], start_step: int) -> Trackers:
    """The trackers of a run resuming at `start_step` (0 = fresh)."""
    out: list[Tracker] = []
    if tensorboard:
        out.append(TensorBoardTracker(run_dir, purge_step=start_step + 1 if start_step else None))
    if wandb:
        out.append(WandbTracker(run_dir, project, mode, config))
    return Trackers(out)
