"""The step callbacks of [validation] and [tracking] for one run (rank 0), built by engine/experiment.py's
`train_run` beside the miniature world's: the tracker feed (every metrics.jsonl row, flushed at each checkpoint)
and the validation (engine/eval/validation.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config.io import to_toml
from engine.config.schema import Config
from engine.eval.trackers import Trackers, build_trackers, row_scalars

if TYPE_CHECKING:
    from engine.eval.validation import WeightsScope
    from engine.trainer import Trainer


class MetricsFeed:
    """Step callback: each row written to metrics.jsonl goes to the trackers at step index + 1 (engine/eval/
    trackers.py); the trackers flush before each checkpoint, so a kill loses no point a resume would not redo."""

    def __init__(self, trackers: Trackers, save_every: int, total: int):
        self.trackers, self.save_every, self.total = trackers, save_every, total

    def __call__(self, view: Any, step: int) -> None:
        """Log the row of the step just finished, if it was written to metrics.jsonl."""
        row = getattr(view, "last_logged", None)
        if step == 0 or row is None:
            return
        self.trackers.scalars(row_scalars(row), int(row["step"]) + 1)
        if (self.save_every and step % self.save_every == 0) or step == self.total:
            self.trackers.flush()


class EvalCallbacks:
    """The callbacks of one run and the trackers they share; `close()` when the run ends."""

    def __init__(self, config: Config, trainer: Trainer, weights: WeightsScope | None = None):
        c = config
        self.trackers = build_trackers(Path(c.output_dir), c.tracking.tensorboard, c.tracking.wandb,
                                       c.tracking.wandb_project, c.tracking.wandb_mode, _flat(c),
                                       trainer.start_step)
        if trainer.start_step == 0:
            self.trackers.text("config", "```toml\n" + to_toml(c) + "```", 0)
        self.callbacks: list[Callable[[Any, int], None]] = [MetricsFeed(self.trackers, c.train.save_every,
                                                                        c.train.steps)]
        if c.validation.every > 0:
            from contextlib import nullcontext

            from engine.distributed import dist_timeout
            from engine.eval.validation import Validation
            from engine.student import export_student

            def export_best(path: Path) -> Any:  # the trainer's callbacks run under its EMA weights when on
                return export_student(trainer.model, path, trainer.backend)

            self.callbacks.append(Validation(c, trainer.backend, trainer.spec, trainer.device, trainer.start_step,
                                             self.trackers, export_best, weights or nullcontext,
                                             dist_timeout().total_seconds()))

    def close(self) -> None:
        """Flush and close the trackers."""
        self.trackers.close()


def _flat(c: Config) -> dict[str, Any]:
    """The config as one flat {"section.key": value} dict (wandb's config panel)."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            out[f.name] = [dataclasses.asdict(x) for x in value]
        else:
            out[f.name] = value
    return out
