"""Profiling hooks: `--profile-steps` parses and brackets the right steps, NVTX ranges and phase timers are
harmless without CUDA, and a CPU run with both (and kernels.cuda_graphs on) trains normally."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine import profiling
from engine.config import ConfigError, load_config
from engine.metrics import read_metrics
from engine.profiling import CudaProfilerWindow, PhaseTimer, nvtx_range
from engine.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def test_profile_steps_flag_reaches_the_config() -> None:
    args = parse_args(["--profile-steps", "2:5"])
    assert args.profile_steps == "2:5"
    cfg = load_config(REPO / "configs" / "tiny.toml", [f'train.profile_steps="{args.profile_steps}"'])
    assert cfg.train.profile_steps == "2:5"
    with pytest.raises(ConfigError, match="profile_steps"):
        load_config(REPO / "configs" / "tiny.toml", ['train.profile_steps="5:2"'])


def test_profile_steps_invalid_on_the_command_line_exits_2(capsys) -> None:
    assert main(["--config", str(REPO / "configs" / "tiny.toml"), "--profile-steps", "x:1"]) == 2
    assert "profile_steps" in capsys.readouterr().err


def test_profiler_window_brackets_steps(monkeypatch) -> None:
    calls: list[tuple[str, int]] = []
    step = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append(("start", step[0])))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append(("stop", step[0])))
    window = CudaProfilerWindow("2:4")
    for step[0] in range(6):
        window.before_step(step[0])
        window.after_step(step[0])
    assert calls == [("start", 2), ("stop", 3)]


def test_profiler_window_is_harmless_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    window = CudaProfilerWindow("0:2")
    for step in range(3):
        window.before_step(step)
        window.after_step(step)
    assert not window.active
    CudaProfilerWindow("").before_step(0)  # no window: nothing to do


def test_nested_phase_ranges_time_on_cpu(monkeypatch) -> None:
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.range("student"):
            with timer.range("student/forward"):
                torch.randn(64, 64) @ torch.randn(64, 64)
            with timer.range("student/backward"):
                pass
    seconds = timer.pop()
    assert set(seconds) == {"student", "student/forward", "student/backward"}
    assert seconds["student"] >= seconds["student/forward"] + seconds["student/backward"] > 0
    assert timer.pop() == {}
    monkeypatch.setattr(profiling, "_nvtx", None)  # without the nvtx package the ranges are no-ops
    with nvtx_range("field:x/base"):
        pass


@pytest.mark.slow
def test_cpu_run_with_profile_steps_and_cuda_graphs(tmp_path: Path, caplog) -> None:
    """The CLI path: --profile-steps and kernels.cuda_graphs on a CPU machine (runner's eager fallback)."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flowopd"):
        rc = main(["--config", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(out),
                   "--profile-steps", "0:1", "--set", "train.steps=2", "--set", "rollout.steps=3",
                   "--set", "rollout.group_size=1", "--set", "kernels.cuda_graphs=true", "--set", "train.save_every=0"])
    assert rc == 0
    assert sum("rollouts on cpu run eagerly" in r.message for r in caplog.records) == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("time/rollout", "time/fields", "time/student", "time/student/forward", "time/student/backward",
                "time/optimizer"):
        assert all(r[key] > 0 for r in rows), key
    assert all(r["loss"] > 0 and not r["skipped"] for r in rows)
