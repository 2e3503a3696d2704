"""SIGKILL the training process at every phase of a step and of a checkpoint write, and at random moments; re-run
the same command each time. The finished run must equal an uninterrupted one bit-exactly (metrics, data order,
optimizer state, exported adapter) with every step logged exactly once, and no half-written checkpoint loaded."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_checkpoints
from engine.faults import ENV as FAULT_ENV
from engine.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
SETTINGS = ["rollout.steps=4", f"train.steps={STEPS}", "train.save_every=2", "rollout.group_size=1",
            "train.keep_checkpoints=2"]
EXACT = ("step", "loss", "field", "anchor", "grad_norm", "lr", "skipped", "data_crc", "field/compose", "field/text")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def command(out: Path) -> list[str]:
    sets = sum((["--set", s] for s in SETTINGS), [])
    return [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "tiny.toml"),
            *sets, "--output-dir", str(out)]


def environment(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", FAULT_ENV):
        env.pop(key, None)
    if fault:
        env[FAULT_ENV] = fault
    return env


def launch(out: Path, fault: str | None = None, kill_when: Callable[[], bool] | None = None,
           delay: float = 0.0) -> tuple[int, str]:
    """Run the training command once; with `kill_when`, SIGKILL it `delay` seconds after that predicate (polled
    every 5 ms) first holds. Returns (return code, output)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(command(out), env=environment(fault), stdout=fh, stderr=subprocess.STDOUT)
        if kill_when is not None:
            deadline = time.monotonic() + 300
            while not kill_when() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def tags(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in complete_checkpoints(out / "checkpoints"))


def resumed_from(text: str) -> tuple[str, int] | None:
    found = RESUMED.findall(text)
    assert len(found) <= 1
    return (Path(found[0][0]).name, int(found[0][1])) if found else None


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [m["step"] for m in read_metrics(path)] if path.exists() else []


def state_equal(a: object, b: object, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            state_equal(x, y, f"{where}[{i}]")


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    rc, text = launch(reference)
    assert rc == 0, text[-3000:]

    out = tmp_path / "killed"
    seed = int(os.environ.get("FLOWOPD_KILL_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    # (fault, complete checkpoints afterwards, checkpoint resumed from, steps in metrics.jsonl afterwards,
    #  what the start-up log must say about the previous kill's leftovers)
    partial2 = f"removed {out / 'checkpoints' / 'step_00000002.partial'}"
    script = [
        ("ckpt.write@2=kill", [], None, [0, 1], ""),  # half of DeepSpeed's optimizer-state file written
        ("ckpt.saved@2=kill", [], None, [0, 1], partial2),  # DeepSpeed wrote step_2.partial, no manifest
        ("ckpt.manifest@2=kill", [], None, [0, 1], partial2),  # manifest in step_2.partial, not renamed
        ("ckpt.renamed@4=kill", [2, 4], None, [0, 1, 2, 3], partial2),  # latest.json still names step_2
        ("ckpt.pointer@6=kill", [2, 4, 6], ("step_00000004", 4), [0, 1, 2, 3, 4, 5], ""),  # not pruned yet
        ("step.end@6=kill", [2, 4, 6], ("step_00000006", 6), [0, 1, 2, 3, 4, 5], ""),  # line 6 not written
        ("step.logged@7=kill", [2, 4, 6], ("step_00000006", 6), [0, 1, 2, 3, 4, 5, 6, 7], ""),  # 6, 7 redone
    ]
    for fault, complete, resumed, steps, says in script:
        rc, text = launch(out, fault)
        context = f"{fault}: rc={rc}\n{text[-3000:]}"
        assert rc == -signal.SIGKILL, context
        assert tags(out) == complete, context
        assert resumed_from(text) == resumed, context
        assert logged_steps(out) == steps, context
        assert says in text, context
    # SIGKILL from outside at random moments: once during start-up/resume, then three times while training, each
    # shortly after the metrics line of a random step appeared (inside a step, a checkpoint write, the export...)
    def started() -> bool:
        return True

    def logged(step: int) -> Callable[[], bool]:  # by this launch: after its resume rewrote metrics.jsonl
        log = out.parent / f"{out.name}.log"
        return lambda: "opd:" in log.read_text() and step in logged_steps(out)

    for trigger, what, delay in [(started, "start", rnd.uniform(0.5, 6.0))] + [
            (logged(t), f"metrics line {t}", rnd.uniform(0.0, 0.12)) for t in sorted(rnd.sample(range(6, STEPS), 3))]:
        before = tags(out)
        rc, text = launch(out, kill_when=trigger, delay=delay)
        context = f"seed {seed}, kill {delay:.2f} s after {what}: rc={rc}\n{text[-3000:]}"
        assert rc in (0, -signal.SIGKILL), context
        found = resumed_from(text)
        if found is not None:  # only ever a complete checkpoint, the newest one there was
            assert found == (f"step_{before[-1]:08d}", before[-1]), context
        steps = logged_steps(out)
        print(f"random kill {delay:.2f} s after {what}: rc {rc}, resumed {found}, checkpoints "
              f"{before} -> {tags(out)}, {len(steps)} steps logged")
        assert steps == sorted(set(steps)) == list(range(len(steps))), context
    rc, text = launch(out)
    assert rc == 0 and "done:" in text, text[-3000:]

    # the result is the uninterrupted run's, bit for bit
    got, want = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(STEPS))
    assert [{k: m.get(k) for k in EXACT} for m in got] == [{k: m.get(k) for k in EXACT} for m in want]
    assert (out / "export" / "adapter_model.safetensors").read_bytes() == \
        (reference / "export" / "adapter_model.safetensors").read_bytes()
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        a = torch.load(out / "checkpoints" / f"step_{STEPS:08d}" / name, weights_only=False)
        b = torch.load(reference / "checkpoints" / f"step_{STEPS:08d}" / name, weights_only=False)
        for key in ("optimizer_state_dict", "module", "lr_scheduler", "global_steps", "skipped_steps", "step",
                    "nonfinite_streak"):
            if key in a or key in b:
                state_equal(a[key], b[key], f"{name}:{key}")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith((".partial", ".deleting"))]
