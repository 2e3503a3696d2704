"""Test-only fault injection for the reliability tests (docs/reliability.md). Off unless `FLOWOPD_FAULT` is set.

The variable is read once when the Trainer starts; with it unset `from_env` returns None and the trainer's
hook sites are a single `is not None` test per step or checkpoint, nothing else.

    FLOWOPD_FAULT="<point>@<step>[:<rank>]=<action>[,...]"

points (in the order they happen):
  step.begin      start of optimizer step <step>, before its rollout
  step.rollout    inside the first rollout of step <step> (its phase is `rollout`)
  step.end        after step <step>'s optimizer update, before its metrics line is written
  step.logged     after step <step>'s metrics line, before a checkpoint that follows it
  ckpt.write      checkpoint <step> (the step it resumes at): DeepSpeed is writing `<tag>.partial`
                  (action `enospc` makes its optimizer-state file write fail: torch.save into /dev/full, the
                  error a full disk gives (a RuntimeError from torch's zip writer), after a truncated file is
                  left in place; action `kill` leaves the first half of that file on disk, then SIGKILLs; rank 0
                  has written the module-state file by then)
  ckpt.saved      every rank's DeepSpeed files are in `<tag>.partial`; no manifest yet
  ckpt.manifest   the manifest is written into `<tag>.partial`; not yet renamed
  ckpt.renamed    `<tag>.partial` was renamed to `<tag>`; `latest.json` still names the previous one
  ckpt.pointer    `latest.json` names `<tag>`; older checkpoints not yet pruned
actions:
  kill     SIGKILL this process (no cleanup, no flush: what an OOM killer or a preempted node does)
  hang     stop making progress (sleep) without exiting: a stuck rank
  enospc   raise OSError(ENOSPC) from the writer
`:<rank>` restricts the fault to one rank (default: every rank).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "FLOWOPD_FAULT"
POINTS = ("step.begin", "step.rollout", "step.end", "step.logged", "ckpt.write", "ckpt.saved", "ckpt.manifest",
          "ckpt.renamed", "ckpt.pointer")
ACTIONS = ("kill", "hang", "enospc")


@dataclass(frozen=True)
class Fault:
    """One injected fault: at `point` of step `step` (on `rank`, or every rank), do `action`."""
    point: str
    step: int
    rank: int | None
    action: str


def parse(spec: str) -> list[Fault]:
    """The faults of a FLOWOPD_FAULT spec; ValueError naming the variable on bad syntax."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            where, action = item.split("=")
            point, at = where.split("@")
            step, _, rank = at.partition(":")
            fault = Fault(point, int(step), int(rank) if rank else None, action)
        except ValueError as exc:
            raise ValueError(f"{ENV}: cannot parse {item!r}; expected <point>@<step>[:<rank>]=<action>") from exc
        if fault.point not in POINTS or fault.action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r}: point must be one of {POINTS}, action one of {ACTIONS}")
        faults.append(fault)
    return faults


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device (injected by {ENV}: {what})")


class FaultInjector:
    """The hooks of engine/hooks.py acting out this rank's faults."""
    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]
        self.rank = rank

    def hit(self, point: str, step: int) -> None:
        """Perform the fault registered for (point, step) on this rank, if any."""
        for f in self.faults:
            if f.point == point and f.step == step:
                if f.action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif f.action == "hang":
                    while True:
                        time.sleep(3600)
                elif f.action == "enospc" and point != "ckpt.write":
                    raise _enospc(f"{point}@{step}")

    def wrap_writer(self, step: int, save: Callable[..., Any]) -> Callable[..., Any]:
        """`save(state_dict, path)` (DeepSpeed's checkpoint-engine writer), failing on the optimizer-state file
        when `ckpt.write@step` is `enospc` or `kill`: the fault lands inside DeepSpeed's own write."""
        actions = {f.action for f in self.faults if f.point == "ckpt.write" and f.step == step}
        if not actions & {"enospc", "kill"}:
            return save

        def failing_save(state_dict: Any, path: str) -> Any:
            if "optim_states" not in str(path):
                return save(state_dict, path)
            if "kill" in actions:  # killed mid-write: what torch.save had streamed out so far, then nothing
                import io

                import torch

                buffer = io.BytesIO()
                torch.save(state_dict, buffer)
                with open(path, "wb") as fh:
                    fh.write(buffer.getbuffer()[: buffer.tell() // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            if os.path.exists("/dev/full"):  # the genuine error: torch.save into a full device
                Path(path).write_bytes(b"PK\x03\x04")  # what a full disk leaves: the start of the zip
                return save(state_dict, "/dev/full")
            raise _enospc(f"ckpt.write@{step} {path}")

        return failing_save


def from_env(rank: int) -> FaultInjector | None:
    """This rank's fault injector, or None when FLOWOPD_FAULT is unset or names no fault for it."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    injector = FaultInjector(parse(spec), rank)
    return injector if injector.faults else None
