"""Process-group setup and the few collectives the trainer needs, each bounded by one timeout.

A plain `python engine/train.py` becomes a 1-process group (a free port from the OS). Every collective waits at
most `dist_timeout()` (env FLOWOPD_DIST_TIMEOUT, default 600 s): a dead or stuck peer ends the rank with a clear
message instead of a hang; inside a step the per-step watchdog (engine/watchdog.py) also names the stuck rank and its
phase. See docs/reliability.md and docs/multinode.md.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch

log = logging.getLogger("flowopd")

# Seconds a rank waits in a collective (and at start-up rendezvous) before giving up on a dead or stuck peer. torch's
# gloo default is 30 min. It must exceed the longest legitimate wait, all of them rank-0-only work the others wait for
# at a barrier: building the prompt cache (SD3.5's T5-XXL on one GPU: ~6 ms a prompt by FLOPs, so 10k prompts take
# about a minute; larger sets are built beforehand with `python -m engine.data.encode`), hashing a checkpoint (the
# LoRA state of SD3.5-M is 0.38 GB: ~1 s), converting one to the universal format, a rank-0 evaluation callback.
# Stuck steps are the watchdog's job (train.step_timeout), so this only bounds the waits outside them.
DIST_TIMEOUT_ENV = "FLOWOPD_DIST_TIMEOUT"
DIST_TIMEOUT_S = 600.0


def dist_timeout() -> datetime.timedelta:
    """The collective timeout of this run (FLOWOPD_DIST_TIMEOUT seconds; ValueError naming a bad value)."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DIST_TIMEOUT_S
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError
    except ValueError:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def _apply_timeout_to_all_groups(timeout: datetime.timedelta) -> None:
    """Give every process group the run's timeout. DeepSpeed reduces gradients over groups it creates with
    `dist.new_group`, which take torch's backend default (30 min for gloo), not the world group's timeout:
    measured, a stuck peer held the other rank in ZeRO's gradient all-reduce past a 15 s world timeout."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    try:
        groups = list(c10d._world.pg_map)
        for group in groups:
            c10d._set_pg_timeout(timeout, group)
    except (AttributeError, RuntimeError, ValueError) as exc:  # private torch API: degrade to its defaults
        log.warning("could not set the %s s timeout on DeepSpeed's process groups (%s); a stuck rank may "
                    "block the others for torch's default timeout", timeout.total_seconds(), exc)
    else:
        if dist.get_world_size() > 1:
            log.info("collective timeout %g s on %d process groups", timeout.total_seconds(), len(groups))


def is_collective_error(exc: BaseException) -> bool:
    """A failed or timed-out collective (as opposed to, e.g., a failed file write)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    )


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); a plain `python engine/train.py` becomes a 1-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # a port the OS says is free: 29500 + pid % 2000 collided (EADDRINUSE) with several runs on one machine
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    deepspeed.init_distributed(verbose=False, timeout=dist_timeout())
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def after_engine_init(world: int) -> None:
    """Once DeepSpeed has made its process groups: give them the run's timeout too."""
    if world > 1:
        _apply_timeout_to_all_groups(dist_timeout())


class Collectives:
    """The trainer's collectives over the world group; all no-ops with one rank."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def barrier(self) -> None:
        """Wait for every rank."""
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def all_ranks(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (an all-reduce; also the barrier between checkpoint phases)."""
        import torch.distributed as dist

        if self.world == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def mean(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Values averaged over ranks (one small all-reduce), so logs match any world size."""
        import torch.distributed as dist

        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        dist.all_reduce(packed)
        return dict(zip(keys, packed / self.world))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled by torch.distributed: only for the engine's own small objects)."""
        import torch.distributed as dist

        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on every rank), concatenated along dim -1 in rank order."""
        import torch.distributed as dist

        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def union(self, names: list[str]) -> set[str]:
        """The union of every rank's `names`."""
        import torch.distributed as dist

        if self.world == 1:
            return set(names)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, sorted(names))
        return {name for part in gathered for name in part}
