"""bench/gpu_suite.sh (issue 18): its step limits fit the 480 s budget, and its dry run takes the whole control flow
on a CPU (per-wheel install after a refused wheel set, the import gate, every step under its limit, the JSON files,
at most 8 files back at the top of $OUT)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.sh"
STEPS = ["wheels", "gate", "cuda", "fast", "probe", "attention", "teachers", "native", "reference"]


def _plan() -> dict[str, int]:
    text = SUITE.read_text()
    plan = dict(item.split(":") for item in re.search(r'^PLAN="([^"]+)"', text, re.M).group(1).split())
    return {name: int(limit) for name, limit in plan.items()}


def test_step_limits_fit_the_budget_and_match_the_plan() -> None:
    text = SUITE.read_text()
    plan = _plan()
    assert list(plan) == STEPS and sum(plan.values()) <= 480
    calls = dict(re.findall(r"(?:^|\s)(?:step|bench) ([a-z]+) (\d+) ", text, re.M))
    assert {k: int(v) for k, v in calls.items()} == plan  # every step is called with the limit the plan shows
    assert 'BUDGET=${FLOWOPD_SUITE_BUDGET:-480}' in text and 'timeout -s INT -k 15 "$limit"' in text


@pytest.mark.slow  # the whole suite at smoke sizes: ~2 min on an idle 2-core machine, ~4 min at load 8
def test_dry_run_takes_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(SUITE), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    log = (out / "suite.log").read_text() if (out / "suite.log").is_file() else ""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert len(files) <= 8 and all(len(f.parts) == 1 and (out / f).is_file() for f in files), files
    assert {f.name for f in files} == {"suite.log", "env.json", "probe.json", "bench-iteration.json",
                                       "bench-iteration-reference.json", "bench-attention.json",
                                       "bench-multi_teacher.json", "bench-sde_step.json"}
    env_json = json.loads((out / "env.json").read_text())
    steps = {s["step"]: s for s in env_json["steps"]}
    assert list(steps) == STEPS
    assert all(s["rc"] == "0" for s in steps.values()), env_json["steps"]
    assert all(int(s["seconds"]) <= int(s["limit"]) + 1 for s in steps.values())
    # the broken wheel made pip refuse the set; one wheel at a time installed the good one
    assert "bulk install refused: one wheel at a time" in log and "WHEEL FAILED" in log and "flowopd_broken" in log
    assert env_json["imports"]["flowopd_dry"] != "missing" and not env_json["missing"]
    for name in ("bench-iteration.json", "bench-iteration-reference.json"):
        (bench,) = json.loads((out / name).read_text())["benchmarks"]
        e = bench["extra_info"]
        assert e["s_per_iteration"] > 0 and e["phase_seconds"] and "h2d" in e["host_syncs_total"]
        assert bench["extra_info"]["path"] in name or (e["path"] == "fast" and name == "bench-iteration.json")
        assert json.loads((out / name).read_text())["flowopd_suite"]["commit"]
    probe = json.loads((out / "probe.json").read_text())["parts"]
    assert set(probe) == {"sdpa", "checkpointing", "lora_merge"} and not any("error" in p for p in probe.values())
    assert "fast / reference:" in run.stdout  # the summary table at the end of the output
