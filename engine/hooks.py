"""Points in a run where a test may act: a no-op `TrainerHooks` by default; fault injection (engine/faults.py,
enabled by FLOWOPD_FAULT) implements the same two methods. The trainer and the checkpointer call the hooks
unconditionally, so there is no fault logic inline in them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Hooks(Protocol):
    """What the trainer calls at its hook points."""

    def hit(self, point: str, step: int) -> None:
        """Called at `point` (see engine/faults.py POINTS) of optimizer step / checkpoint `step`."""
        ...

    def wrap_writer(self, step: int, save: Callable[..., Any]) -> Callable[..., Any]:
        """DeepSpeed's checkpoint file writer for checkpoint `step` (returned unchanged when nothing is injected)."""
        ...


class TrainerHooks:
    """No hooks: every point passes."""

    def hit(self, point: str, step: int) -> None:
        """Nothing happens."""

    def wrap_writer(self, step: int, save: Callable[..., Any]) -> Callable[..., Any]:
        """The writer itself."""
        return save


def hooks_from_env(rank: int) -> Hooks:
    """Fault injection when FLOWOPD_FAULT names faults for this rank, else the no-op hooks."""
    from engine import faults

    return faults.from_env(rank) or TrainerHooks()
