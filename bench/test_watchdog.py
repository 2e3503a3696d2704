"""The per-step watchdog's cost: the main thread's bookkeeping per step and a whole tiny training step, with and
without the watchdog thread running (engine/watchdog.py; the claim: ~0, a thread that wakes once a second, no syncs).

    pytest bench/test_watchdog.py -s --benchmark-json=bench/results/<date>-<device>-watchdog.json

`bookkeeping`: one step's worth of main-thread work the watchdog adds or reads: begin, 8 PhaseTimer ranges (a
tiny step opens ~8), end. `train_step`: Trainer.train_step of configs/tiny.toml (4 rollout steps, group 1) wrapped
in begin/end, the thread publishing every second. Compare the medians of `on` and `off` in one run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.profiling import PhaseTimer
from engine.watchdog import StepWatchdog

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "fields", "student", "student/forward", "student/backward", "optimizer", "fields", "student")


@pytest.mark.parametrize("watchdog", ["off", "on"])
def test_bookkeeping(benchmark, watchdog: str) -> None:
    timer = PhaseTimer(torch.device("cpu"))
    dog = StepWatchdog(0, 1, timer, 3600.0 if watchdog == "on" else -1)
    dog.start()
    step = iter(range(10**9))

    def one_step() -> None:
        s = next(step)
        dog.begin(s)
        for name in PHASES:
            with timer.range(name):
                pass
        dog.end(s)

    try:
        benchmark(one_step)
    finally:
        dog.stop()
    benchmark.extra_info.update(watchdog=watchdog, phases_per_step=len(PHASES))
    print(f"\n[watchdog] bookkeeping {watchdog:>3}: {benchmark.stats.stats.median * 1e6:7.2f} us/step")


@pytest.mark.parametrize("watchdog", ["off", "on"])
def test_train_step(benchmark, watchdog: str, tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 100))
    cfg = load_config(REPO / "configs" / "tiny.toml", ["rollout.steps=4", "rollout.group_size=1", "train.steps=1000",
                                                       "train.save_every=0", f'output_dir="{tmp_path}"',
                                                       f"train.step_timeout={3600.0 if watchdog == 'on' else -1}"])
    trainer = Trainer(cfg)
    trainer.watchdog.start()
    step = iter(range(10**6))
    trainer.train_step(next(step))  # DeepSpeed's first step

    def one_step() -> None:
        s = next(step)
        trainer.watchdog.begin(s)
        trainer.train_step(s)
        trainer.watchdog.end(s)

    try:
        benchmark.pedantic(one_step, rounds=int(os.environ.get("FLOWOPD_BENCH_ROUNDS", "30")), iterations=1)
    finally:
        trainer.watchdog.stop()
        trainer.close()
    benchmark.extra_info.update(watchdog=watchdog)
    print(f"\n[watchdog] tiny train_step {watchdog:>3}: {benchmark.stats.stats.median * 1e3:7.2f} ms/step")
