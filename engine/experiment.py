"""What `engine/train.py` runs: the configured student, then each `report.variants` student, then the report.

A config without `[report]` is one training run. With `report.enabled` (the embedded default), the variants are
trained one after another in `<output_dir>/variants/<name>` (each a complete run: its own checkpoints, metrics,
export, resumable), and rank 0 then measures the miniature world's table (engine.toy.report). Re-running the same
command resumes whichever run was interrupted; finished runs only re-export their student.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from engine.config import Config

log = logging.getLogger("flowopd")


def train_run(config: Config) -> tuple[int, Path]:
    """Train (or resume, or just re-export) one student; returns (rank, export dir)."""
    from engine.trainer import Trainer

    callbacks = []
    trainer = Trainer(config)
    try:
        if config.report.eval_every and trainer.rank == 0:
            from engine.toy.report import RewardCurve

            callbacks.append(RewardCurve(config))
        trainer.train(callbacks)
    finally:
        trainer.close()
    rank = trainer.rank
    del trainer
    gc.collect()  # the next run builds its own model + DeepSpeed engine: free this one's first
    return rank, Path(config.output_dir) / "export"


def run(config: Config) -> int:
    """Every run of `config` in order, then the report; returns this process's rank."""
    rank = 0
    if not config.report.enabled:
        rank, export = train_run(config)
        if rank == 0:
            print(f"done: {export}")
        return rank
    from engine.toy.report import student_runs, write_report

    for name, run_config in student_runs(config):
        if rank == 0:
            log.info("training %r in %s", name, run_config.output_dir)
        rank, export = train_run(run_config)
        if rank == 0:
            print(f"done: {name}: {export}")
    if rank == 0:
        text = write_report(config)
        print(text)
        print(f"report: {Path(config.output_dir) / 'report.md'}")
    return rank
