"""What `engine/train.py` runs: the configured student, then each `[experiment]` variant, then the report.

A config without `[report]` is one training run. With `report.enabled` (the embedded default), each variant
(`experiment.variants`) is a complete run of its own in `<output_dir>/variants/<name>` (checkpoints, metrics,
export, resumable), and rank 0 then measures the table of the miniature world `report.world` (its plug-in,
engine/worlds). Re-running the same command resumes whichever run
was interrupted; finished runs only re-export their student.

Single-process CPU runs train the variants at the same time as the main run, each in a child process
(`python engine/train.py --config <variant>/config.launch.toml`, log in `<variant>/train.log`) with its share of the
cores: on 2 cores the default's two students take ~175 s + ~165 s one after another with 2 threads each, and
~200 s side by side with 1 thread each, since this small model's ops scale poorly across threads (a batch-32
forward: 111 ms on 1 thread, 93 ms on 2). A child dies with its parent (PR_SET_PDEATHSIG) and each run dir is
locked (engine.files.RunDirLock), so a re-run after a kill never races a leftover child. With several ranks,
or on a GPU, the runs go one after another.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from engine.config.io import to_toml
from engine.config.load import experiment_runs
from engine.config.schema import Config
from engine.resume import ResumePolicy

log = logging.getLogger("flowopd")

# Set by torch.distributed launchers; a child run must not join its parent's process group.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                 "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class VariantError(RuntimeError):
    """A variant run (child process) failed; the message names its log."""


def train_run(config: Config, policy: ResumePolicy | None = None) -> tuple[int, Path]:
    """Train (or resume, or just re-export) one student in this process; returns (rank, export dir)."""
    from engine.trainer import Trainer

    trainer = Trainer(config, policy)
    evals = None
    try:
        callbacks = []
        if trainer.rank == 0:  # trackers and validation (engine/eval); the other ranks wait at the next collective
            from engine.eval.callbacks import EvalCallbacks

            evals = EvalCallbacks(config, trainer)
            callbacks = list(evals.callbacks)
        if config.report.world and trainer.rank == 0:
            from engine.worlds import get_world

            callbacks += list(get_world(config.report.world).callbacks(config))
        trainer.train(callbacks)
    finally:
        if evals is not None:
            evals.close()
        trainer.close()
    rank = trainer.rank
    del trainer
    gc.collect()  # a following run builds its own model + DeepSpeed engine: free this one's first
    return rank, Path(config.output_dir) / "export"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed parent may leave the child running; its run-dir lock still protects
        pass


def _spawn(config: Config, threads: int, policy: ResumePolicy) -> tuple[subprocess.Popen, Path]:
    """Start `config` as a child training process; returns it and its log file."""
    from engine.files import write_atomic

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the child's own input, beside its run dir's config.toml (which its trainer writes once the resume is checked)
    cfg_file = out / "config.launch.toml"
    write_atomic(cfg_file, to_toml(config))
    flags = [f for f, on in (("--allow-config-change", policy.allow_config_change), ("--restart", policy.restart))
             if on]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_file = out / "train.log"
    with open(log_file, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--config", str(cfg_file), *flags],
            stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
    return proc, log_file


def _parallel(config: Config) -> bool:
    return (config.experiment.parallel and int(os.environ.get("WORLD_SIZE", "1")) == 1
            and not torch.cuda.is_available() and len(config.experiment.variants) > 0)


def run(config: Config, policy: ResumePolicy | None = None) -> int:
    """Every run of `config`, then the report; returns this process's rank."""
    policy = policy or ResumePolicy()
    rank = 0
    if not config.report.enabled:
        rank, export = train_run(config, policy)
        if rank == 0:
            print(f"done: {export}")
        return rank
    from engine.worlds import get_world

    runs = experiment_runs(config)
    if _parallel(config):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // len(runs))
        children = []
        for name, run_config in runs[1:]:
            proc, log_file = _spawn(run_config, threads, policy)
            log.info("training %r in a child process (pid %d, %d thread(s)); log: %s", name, proc.pid, threads,
                     log_file)
            children.append((name, proc, log_file))
        own_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            log.info("training %r in %s", runs[0][0], config.output_dir)
            train_run(config, policy)
            print(f"done: {runs[0][0]}: {Path(config.output_dir) / 'export'}")
        except BaseException:
            for _, proc, _ in children:
                proc.terminate()
            raise
        finally:
            torch.set_num_threads(own_threads)
        failed = []
        for name, proc, log_file in children:
            if proc.wait() != 0:
                failed.append(f"{name!r} (exit code {proc.returncode}; see {log_file})")
            else:
                print(f"done: {name}: {Path(log_file).parent / 'export'}")
        if failed:
            raise VariantError(f"variant run(s) failed: {', '.join(failed)}. Re-run the same command to resume them")
    else:
        for name, run_config in runs:
            if rank == 0:
                log.info("training %r in %s", name, run_config.output_dir)
            rank, export = train_run(run_config, policy)
            if rank == 0:
                print(f"done: {name}: {export}")
    if rank == 0:
        text = get_world(config.report.world).write_report(config, runs)
        print(text)
        print(f"report: {Path(config.output_dir) / 'report.md'}")
    return rank
