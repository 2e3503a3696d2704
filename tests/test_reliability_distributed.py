"""Two ranks (two CPU processes, gloo), started the way torchrun/SLURM do (RANK, WORLD_SIZE, MASTER_* per process)
rather than by the deepspeed launcher, which would kill the survivors itself: a dead, stuck or absent rank makes
the others exit with a clear message instead of hanging; a checkpoint that fails on one rank only is discarded on
all; a 2-rank checkpoint resumes on 1 rank with exactly the same optimizer state."""

from __future__ import annotations

import glob
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.distributed import DIST_TIMEOUT_ENV
from engine.faults import ENV as FAULT_ENV
from engine.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["rollout.steps=4", "train.steps=4", "train.save_every=1", "rollout.group_size=1"]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, ranks: list[int], world: int, env_extra: dict[str, str],
                extra: list[str] = ()) -> list[subprocess.Popen]:
    port = str(free_port())
    sets = sum((["--set", s] for s in [*SETTINGS, "train.prompts_per_step=1", *extra]), [])
    procs = []
    for rank in ranks:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               **env_extra}
        log = open(out.parent / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "tiny.toml"),
             *sets, "--output-dir", str(out)], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"rank did not exit within {timeout} s: it hangs")
    return rc, time.monotonic() - t0


def rank_log(out: Path, rank: int) -> str:
    return (out.parent / f"rank{rank}.log").read_text()


def test_dead_rank_stops_the_other_clearly_and_its_checkpoint_resumes_on_one_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # rank 1: its optimizer-state write of checkpoint 1 fails (disk full), then it dies at the start of step 3
    procs = start_ranks(out, [0, 1], 2, {FAULT_ENV: "ckpt.write@1:1=enospc,step.begin@3:1=kill",
                                         DIST_TIMEOUT_ENV: "120"})
    rc1, _ = wait(procs[1], 300)
    rc0, after = wait(procs[0], 100)
    log0, log1 = rank_log(out, 0), rank_log(out, 1)
    assert rc1 == -9, log1[-3000:]
    assert rc0 == 1 and after < 60, log0[-3000:]  # noticed at once (connection reset), not after the timeout
    assert "error: rank 0/2: communication with another rank failed" in log0
    assert "Another rank probably died or is stuck" in log0 and "Re-run the same command to resume" in log0
    # checkpoint 1 failed on rank 1 only: both ranks agreed, discarded it and carried on
    assert "checkpoint step_00000001 could not be written (disk full or I/O error? RuntimeError:" in log1
    assert "checkpoint step_00000001 could not be written (failed on another rank)" in log0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000002", "step_00000003"]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]

    # resume on ONE rank (same global batch: 2 prompts per rank): converted to the universal format and loaded
    from engine.trainer import Trainer

    saved = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in
             sorted(glob.glob(str(out / "checkpoints" / "step_00000003" / "zero_pp_rank_*_optim_states.pt")))]
    assert len(saved) == 2
    cfg = load_config(REPO / "configs" / "tiny.toml", [*SETTINGS, "train.prompts_per_step=2", f'output_dir="{out}"'])
    trainer = Trainer(cfg)
    assert trainer.start_step == 3 and trainer.world == 1
    opt = trainer.engine.optimizer
    state = next(iter(opt.optimizer.state.values()))
    mine = {"fp32": opt.single_partition_of_fp32_groups[0], "exp_avg": state["exp_avg"],
            "exp_avg_sq": state["exp_avg_sq"]}
    theirs = {"fp32": torch.cat([sd["single_partition_of_fp32_groups"][0] for sd in saved]),
              **{k: torch.cat([sd["base_optimizer_state"]["state"][0][k] for sd in saved])
                 for k in ("exp_avg", "exp_avg_sq")}}
    for key, value in mine.items():
        n = value.numel()
        assert torch.equal(value, theirs[key][:n]), key  # the very same numbers, re-partitioned
        assert not theirs[key][n:].any(), key  # only ZeRO's alignment padding was dropped
    assert int(state["step"]) == 3 and trainer.engine.lr_scheduler.last_epoch == 3
    assert not (out / "checkpoints" / "universal.partial").exists()
    trainer.train()
    trainer.close()
    rows = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in rows] == [0, 1, 2, 3] and all(m["skipped"] is False for m in rows)
    assert (out / "export" / "adapter_model.safetensors").is_file()


def test_stuck_rank_makes_the_other_exit_after_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = start_ranks(out, [0, 1], 2, {FAULT_ENV: "step.begin@1:1=hang", DIST_TIMEOUT_ENV: "15"})
    try:
        rc0, _ = wait(procs[0], 240)
        log0 = rank_log(out, 0)
        assert rc0 == 1, log0[-3000:]
        assert "error: rank 0/2: communication with another rank failed" in log0
        assert "collective timeout 15 s" in log0
        # the watchdogs' records name the culprit even though the collective timeout fired first
        assert "the watchdog saw: stuck: rank 1 between phases of step 1 (running" in log0, log0[-3000:]
        assert procs[1].poll() is None  # the stuck rank is still stuck (its watchdog's limit is the auto 1800 s)
    finally:
        procs[1].kill()
        procs[1].wait()


def test_a_rank_stuck_in_its_rollout_ends_the_job_naming_rank_and_phase(tmp_path: Path) -> None:
    """Stuck outside any collective (in its rollout): the watchdog ends both ranks after train.step_timeout, long
    before the collective timeout, and both messages name rank 1 and the phase."""
    out = tmp_path / "run"
    procs = start_ranks(out, [0, 1], 2, {FAULT_ENV: "step.rollout@2:1=hang", DIST_TIMEOUT_ENV: "300"},
                        ["train.step_timeout=10"])
    try:
        t0 = time.monotonic()
        rc1, _ = wait(procs[1], 240)
        rc0, _ = wait(procs[0], 60)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log0, log1 = rank_log(out, 0), rank_log(out, 1)
    assert rc1 == 1 and rc0 == 1, log0[-2000:] + log1[-2000:]
    assert took < 200, took  # far below the 300 s collective timeout
    assert "error: rank 1/2: step 2 has not finished after" in log1 and "train.step_timeout = 10 s" in log1
    stuck = re.compile(r"stuck: rank 1 in phase 'rollout' for [\d.]+ s of step 2 \(running")
    assert stuck.search(log1) and "Waiting for it: rank 0 in phase" in log1
    assert stuck.search(log0)  # rank 0's own watchdog, or its failed collective with the watchdog's records
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1]


def test_missing_rank_at_start_times_out_clearly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (proc,) = start_ranks(out, [0], 2, {DIST_TIMEOUT_ENV: "10"})
    rc, _ = wait(proc, 180)
    log = rank_log(out, 0)
    assert rc == 1, log[-3000:]
    assert "error: rank 0/2: communication with another rank failed" in log and "timeout 10 s" in log
