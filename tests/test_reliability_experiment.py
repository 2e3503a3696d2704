"""Faults of the embedded default's multi-run job (engine.experiment): two processes on one run dir, and SIGKILL of
the parent while a variant trains in its child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.files import RunDirLock
from engine.metrics import read_metrics
from engine.train import main

REPO = Path(__file__).resolve().parents[1]
DANCE = "OPD student (DanceOPD: low-noise MSE)"
STEPS = 6
SHORT = [f"train.steps={STEPS}", "train.prompts_per_step=2", "rollout.group_size=2", "train.save_every=2",
         "report.eval_every=3", "report.samples_per_prompt=1",
         f'experiment.variants."{DANCE}"=["opd.loss=mse", "rollout.sampler=ode", "opd.query_states=1", '
         f'"opd.query_bias=low", "opd.beta=0.0", "train.steps={STEPS}"]']


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its reaping is pending


def test_a_second_process_on_one_run_dir_is_refused_until_the_holder_dies(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from engine.files import RunDirLock; "
         "RunDirLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, env=_env(), cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        with pytest.raises(CheckpointError, match=rf"in use by another training process \(pid {holder.pid}\)"):
            RunDirLock(tmp_path)
        # the CLI: one clear line, and the holder's run dir is left as it was
        assert main(["--config", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(tmp_path)]) == 1
        assert f"in use by another training process (pid {holder.pid})" in capsys.readouterr().err
        assert not (tmp_path / "config.toml").exists()
    finally:
        holder.kill()
        holder.wait()
    RunDirLock(tmp_path).release()  # SIGKILL released it: no stale lock


@pytest.mark.slow
def test_killing_the_default_job_mid_variant_kills_its_child_and_a_rerun_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--output-dir", str(out),
           *sum((["--set", s] for s in SHORT), [])]
    variant = out / "variants" / "opd-student-danceopd-low-noise-mse"
    with open(tmp_path / "first.log", "w") as fh:
        parent = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        child = None
        while time.monotonic() < deadline and parent.poll() is None:
            m = re.search(r"child process \(pid (\d+)", (tmp_path / "first.log").read_text())
            if m and (variant / "metrics.jsonl").is_file() and read_metrics(variant / "metrics.jsonl"):
                child = int(m.group(1))
                break
            time.sleep(0.05)
        assert child is not None and parent.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the variant's child process outlived its killed parent"

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert (out / "report.md").is_file() and "OPD student (Flow-OPD: transition KL)" in (out / "report.md").read_text()
    for run in (out, variant):
        assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(STEPS)), run
