"""The per-step watchdog in one process: it fires on a step that outlives the limit, naming the rank and the phase,
never on one that ends in time; the auto limit follows the measured step times; with several ranks the message names
the rank that is behind (read from the store every rank publishes to). The two-process case, a rank hung in its
rollout, is in tests/test_reliability_distributed.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from engine import watchdog as wd
from engine.profiling import PhaseTimer


class Fired:
    """on_timeout that records instead of ending the process."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.event = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.event.set()


class DictStore:
    """The three calls the watchdog makes of a torch.distributed store."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]


def test_a_step_stuck_in_a_phase_fires_naming_rank_phase_and_limit() -> None:
    timer, fired = PhaseTimer(torch.device("cpu")), Fired()
    dog = wd.StepWatchdog(0, 1, timer, 0.3, on_timeout=fired, poll=0.05)
    dog.start()
    try:
        dog.begin(7)
        with timer.range("rollout"):
            assert fired.event.wait(5.0)
    finally:
        dog.stop()
    (message,) = fired.messages
    assert message.startswith("step 7 has not finished after") and "train.step_timeout = 0.3 s" in message
    assert "stuck: rank 0 in phase 'rollout' for" in message and "of step 7 (running" in message
    assert "resume from the newest" in message


def test_steps_that_end_in_time_never_fire_and_the_thread_stops() -> None:
    timer, fired = PhaseTimer(torch.device("cpu")), Fired()
    # a 5 s limit against 10 ms steps: a loaded 2-core CI machine has stalled this thread for over 1 s (measured)
    dog = wd.StepWatchdog(0, 1, timer, 5.0, on_timeout=fired, poll=0.02)
    dog.start()
    for step in range(8):
        dog.begin(step)
        with timer.range("rollout"):
            time.sleep(0.01)
        dog.end(step)
    time.sleep(5.5)  # between steps nothing is watched (an export, a rank-0 report): longer than the limit
    dog.stop()
    assert fired.messages == [] and not any(t.name == "flowopd-watchdog" for t in threading.enumerate())
    assert len(dog.times) == 8


def test_the_auto_limit_follows_the_measured_step_times() -> None:
    dog = wd.StepWatchdog(0, 1, PhaseTimer(torch.device("cpu")), 0.0)
    assert dog.limit() == wd.FIRST_S  # nothing timed yet: compile, autotune, graph capture
    dog.times.extend([0.5, 0.6])
    assert dog.limit() == wd.FIRST_S
    dog.times.append(0.4)
    assert dog.limit() == wd.FLOOR_S  # 10 x 0.5 s is below the floor
    dog.times.extend([100.0] * 4)
    assert dog.limit() == pytest.approx(wd.FACTOR * 100.0)
    assert "10 x median step 100 s" in dog.describe_limit()
    assert not wd.StepWatchdog(0, 1, PhaseTimer(torch.device("cpu")), -1).enabled
    off = wd.StepWatchdog(0, 1, PhaseTimer(torch.device("cpu")), -1)
    off.start()
    assert off._thread is None


def test_with_several_ranks_the_message_names_the_one_behind() -> None:
    store = DictStore()
    timers = [PhaseTimer(torch.device("cpu")) for _ in range(3)]
    dogs = [wd.StepWatchdog(r, 3, timers[r], 60.0, on_timeout=Fired(), store=store) for r in range(3)]
    for dog in dogs:
        dog.begin(4)
    with timers[0].range("rollout"), timers[1].range("rollout"):
        pass
    with timers[0].range("optimizer"), timers[2].range("rollout"):  # rank 0 went on; rank 2 is still rolling out
        with timers[1].range("optimizer"):
            for dog in dogs:
                dog._publish(dog.record())
            text = dogs[0].diagnosis()
    assert text.startswith("stuck: rank 2 in phase 'rollout' for 0 s of step 4 (running 0 s)")
    assert "Waiting for it: rank 0 in phase 'optimizer' for 0 s of step 4" in text
    assert "rank 1 in phase 'optimizer'" in text
    assert json.loads(store.get("flowopd/watchdog/2"))["phase"] == "rollout"
    store.data.pop("flowopd/watchdog/1")
    assert "No record from rank(s) [1]" in dogs[2].diagnosis()


def test_the_phase_timer_reports_the_innermost_open_phase() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    assert timer.phase() == ("", 0.0)
    with timer.range("outer"):
        with timer.range("inner"):
            name, seconds = timer.phase()
            assert name == "inner" and seconds >= 0
        assert timer.phase()[0] == "outer"
    with pytest.raises(ValueError):
        with timer.range("failing"):
            raise ValueError
    assert timer.phase() == ("", 0.0) and timer.entered == 3 and "failing" not in timer.pop()
