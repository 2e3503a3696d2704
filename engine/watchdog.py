"""The per-step watchdog: a rank stuck in a step ends the job with a message naming the stuck rank and its phase.

A collective timeout only fires on ranks that wait in a collective, and names nobody; a rank stuck outside any
collective (in its rollout, in a hung file system) used to hold every other rank for the 30-minute default. Here every
rank runs one daemon thread. The trainer marks each optimizer step's start and end (`begin`/`end`: a few attribute
writes, no device sync, no collective); the phase comes from the trainer's `PhaseTimer` (engine/profiling.py). Every
`POLL_S` the thread publishes this rank's (step, phase, phases entered) to the process group's store (the TCP store
the ranks rendezvoused with, reachable while the main thread is blocked in a collective or stuck elsewhere). When a
step has run longer than the limit, the thread reads every rank's record, names the rank(s) that are behind and what
they are doing, prints one `error:` line and ends its process (exit 1); the other ranks' watchdogs say the same and
exit, or their next collective fails at once.

The limit: `train.step_timeout` seconds, or with 0 (auto) `max(FLOOR_S, FACTOR x the median of the last steps)`, and
`FIRST_S` until `WARMUP` steps are timed (the first steps compile kernels and capture CUDA graphs). As a backstop for a
thread that holds the GIL (a C extension stuck in a loop stops Python threads too), `faulthandler` is armed each step
to dump every thread's stack and exit after the limit + `BACKSTOP_S`; it runs in C.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from engine.profiling import PhaseTimer

log = logging.getLogger("flowopd")

# Auto limit. A step of SD3.5-M Flow-OPD is tens of seconds on one GPU (DESIGN §3 FLOPs; 50 s per step in bf16 on
# CPU at 128 px); 10 x its median absorbs checkpoint steps and stragglers (a rank-0 checkpoint of the LoRA state is
# ~1 s of hashing) and the 300 s floor keeps fast runs from tripping on a slow file system. The first steps include
# Triton compilation and autotuning and CUDA-graph capture: FIRST_S until WARMUP steps are timed.
FACTOR, FLOOR_S, FIRST_S, WARMUP, WINDOW = 10.0, 300.0, 1800.0, 3, 20
POLL_S = 1.0
BACKSTOP_S = 60.0
# The store lives in rank 0's process; every rank's watchdog fires within about a poll of the others (their steps
# started together), so a rank stays GRACE_S after its message for the others to read every record first (measured:
# without it, rank 1 found no record of rank 0, whose process had just ended).
GRACE_S = 3.0
_KEY = "flowopd/watchdog/{rank}"
_last: StepWatchdog | None = None  # the watchdog of the latest train(), kept after it stops for `last_diagnosis`


def _default_store() -> Any:
    """The default process group's store, or None without one (a single process started without torchrun)."""
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store() if dist.is_initialized() else None
    except (AttributeError, RuntimeError, ValueError):  # private API: without it, only this rank's view is reported
        return None


def _exit(message: str) -> None:
    """Print the message and end this process now (after a stuck step, interpreter shutdown could block)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    time.sleep(GRACE_S)
    os._exit(1)


class StepWatchdog:
    """This rank's watchdog (see the module docstring); `start` once, `begin`/`end` around every step, `stop`."""

    def __init__(self, rank: int, world: int, timer: PhaseTimer, step_timeout: float,
                 on_timeout: Callable[[str], None] = _exit, store: Any = None, poll: float = POLL_S):
        self.rank, self.world, self.timer, self.fixed = rank, world, timer, step_timeout
        self.on_timeout, self.store, self.poll = on_timeout, store, poll
        self.times: deque[float] = deque(maxlen=WINDOW)
        self.step: int | None = None
        self.started = 0.0
        self.entered_at_begin = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """False with `train.step_timeout = -1`."""
        return self.fixed != -1

    def limit(self) -> float:
        """Seconds the current step may take."""
        if self.fixed > 0:
            return self.fixed
        if len(self.times) < WARMUP:
            return FIRST_S
        return max(FLOOR_S, FACTOR * statistics.median(self.times))

    def describe_limit(self) -> str:
        """How the limit was chosen (for the message)."""
        if self.fixed > 0:
            return f"train.step_timeout = {self.fixed:g} s"
        if len(self.times) < WARMUP:
            return f"train.step_timeout auto: {FIRST_S:g} s until {WARMUP} steps are timed"
        return (f"train.step_timeout auto: max({FLOOR_S:g} s, {FACTOR:g} x median step "
                f"{statistics.median(self.times):.3g} s)")

    def start(self) -> None:
        """Start the thread (no-op when disabled or already running)."""
        global _last
        if not self.enabled or self._thread is not None:
            return
        self.store = self.store if self.store is not None else _default_store()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flowopd-watchdog", daemon=True)
        self._thread.start()
        _last = self

    def stop(self) -> None:
        """Stop the thread and the backstop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll)
            self._thread = None
        faulthandler.cancel_dump_traceback_later()

    def begin(self, step: int) -> None:
        """Step `step` starts now (main thread; attribute writes only)."""
        self.entered_at_begin = self.timer.entered
        self.started = time.monotonic()
        self.step = step
        if self._thread is not None:
            try:  # the process's own stderr: sys.stderr may be a stream without a descriptor (a notebook, pytest)
                faulthandler.dump_traceback_later(self.limit() + BACKSTOP_S, exit=True, file=sys.__stderr__)
            except (AttributeError, ValueError, OSError):  # no usable stderr at all: only the Python watchdog
                pass

    def end(self, step: int) -> None:
        """Step `step` (with its checkpoint) is done: its time feeds the auto limit."""
        if self.step == step:
            self.times.append(time.monotonic() - self.started)
        self.step = None

    # ------------------------------------------------------------------------------------- the thread

    def record(self) -> dict[str, Any]:
        """What this rank is doing now (what it publishes)."""
        phase, for_s = self.timer.phase()
        step = self.step
        return {"rank": self.rank, "step": step, "phase": phase, "phase_s": round(for_s, 1),
                "entered": self.timer.entered - self.entered_at_begin,
                "step_s": round(time.monotonic() - self.started, 1) if step is not None else 0.0}

    def _publish(self, record: dict[str, Any]) -> None:
        if self.store is None:
            return
        try:
            self.store.set(_KEY.format(rank=self.rank), json.dumps(record))
        except (RuntimeError, OSError, ValueError):  # store gone (rank 0 died): the message falls back to this rank
            self.store = None

    def records(self) -> list[dict[str, Any]]:
        """Every rank's last published record (this rank's live one; ranks that never published are left out)."""
        out = []
        for r in range(self.world):
            if r == self.rank:
                out.append(self.record())
                continue
            key = _KEY.format(rank=r)
            try:
                if self.store is not None and self.store.check([key]):
                    out.append(json.loads(self.store.get(key)))
            except (RuntimeError, OSError, ValueError):
                continue
        return out

    def diagnosis(self) -> str:
        """Which rank(s) are behind and in what phase, from every rank's record."""
        recs = self.records()

        def where(r: dict[str, Any]) -> str:
            phase = f"in phase {r['phase']!r} for {r['phase_s']:g} s" if r["phase"] else "between phases"
            at = f"of step {r['step']} (running {r['step_s']:g} s)" if r["step"] is not None else "outside a step"
            return f"rank {r['rank']} {phase} {at}"

        def progress(r: dict[str, Any]) -> tuple[int, int]:
            return (r["step"] if r["step"] is not None else 1 << 62, r["entered"])

        behind = min(progress(r) for r in recs)
        stuck = [r for r in recs if progress(r) == behind]
        waiting = [r for r in recs if progress(r) != behind]
        text = "stuck: " + "; ".join(where(r) for r in stuck)
        if waiting:
            text += ". Waiting for it: " + "; ".join(where(r) for r in waiting)
        elif len(recs) > 1:
            text += " (every rank at the same point: a collective, the file system, or a lost node?)"
        if len(recs) < self.world:
            missing = sorted(set(range(self.world)) - {r["rank"] for r in recs})
            text += f". No record from rank(s) {missing}"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            rec = self.record()
            self._publish(rec)
            step = self.step
            if step is None:
                continue
            elapsed = time.monotonic() - self.started
            if elapsed > self.limit():
                where = f"rank {self.rank}/{self.world}: " if self.world > 1 else ""
                self.on_timeout(f"{where}step {step} has not finished after {elapsed:.0f} s "
                                f"({self.describe_limit()}); {self.diagnosis()}. Stopping; re-run the same "
                                f"command to resume from the newest complete checkpoint")
                return


def last_diagnosis() -> str:
    """The latest watchdog's view of every rank ("" without one): for the message of a failed collective."""
    try:
        return _last.diagnosis() if _last is not None else ""
    except (RuntimeError, OSError, ValueError, KeyError):  # a message helper must never mask the error it explains
        return ""
