"""Phase timing and NVTX ranges.

`phases.range(name)` opens an NVTX range (the `nvtx` package: works without CUDA, ~1 us per range;
`torch.cuda.nvtx` raises on CPU builds) and accumulates the phase's wall time. With `train.phase_timing` on, the
phase end synchronises a CUDA device once so the seconds are the GPU's (never inside the rollout's step loop).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:
    import nvtx as _nvtx
except ImportError:  # optional: ranges become no-ops
    _nvtx = None


@contextmanager
def nvtx_range(name: str, color: str = "blue") -> Iterator[None]:
    """An NVTX range in domain `flowopd` (a no-op without the nvtx package)."""
    if _nvtx is None:
        yield
        return
    with _nvtx.annotate(name, color=color, domain="flowopd"):
        yield


class PhaseTimer:
    """Wall time per phase of a step, with NVTX ranges; on CUDA with `sync` the device is synchronised at each phase
    end, so the seconds are GPU seconds (`train.phase_timing`). Without it a phase's seconds are the host's time to
    issue it (plus any wait the phase itself forces), which on CUDA says little about the GPU: one sync per phase
    end (~8 per step at 2 query states) stops the host from running ahead, so it is off unless asked for. It also
    keeps what the watchdog (engine/watchdog.py) reads from its thread: the open phases and how many were entered."""

    def __init__(self, device: torch.device, sync: bool = False):
        self.sync = sync and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.open: list[tuple[str, float]] = []
        """(name, start) of the phases open now, outermost first."""
        self.entered = 0
        """Phases entered so far (ranks of one run enter the same sequence, so a smaller count is behind)."""

    @contextmanager
    def range(self, name: str, color: str = "blue") -> Iterator[None]:
        """Time the block as phase `name`."""
        start = time.perf_counter()
        self.open.append((name, start))
        self.entered += 1
        try:
            with nvtx_range(name, color):
                yield
                if self.sync:
                    torch.cuda.synchronize()
        finally:
            self.open.pop()
        self.seconds[name] += time.perf_counter() - start

    def phase(self) -> tuple[str, float]:
        """(innermost open phase or "", seconds in it); safe to call from another thread."""
        open_now = list(self.open)
        if not open_now:
            return "", 0.0
        name, start = open_now[-1]
        return name, time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The seconds per phase since the last pop, then reset."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out


class CudaProfilerWindow:
    """`--profile-steps A:B`: cudaProfilerStart before step A, Stop after step B-1 (for nsys
    `--capture-range=cudaProfilerApi`). Harmless on CPU."""

    def __init__(self, spec: str):
        self.start, self.stop = (int(x) for x in spec.split(":")) if spec else (-1, -1)
        self.active = False

    def before_step(self, step: int) -> None:
        """cudaProfilerStart before the window's first step."""
        if step == self.start and torch.cuda.is_available():
            torch.cuda.profiler.start()
            self.active = True

    def after_step(self, step: int) -> None:
        """cudaProfilerStop after the window's last step."""
        if self.active and step + 1 >= self.stop:
            torch.cuda.profiler.stop()
            self.active = False
