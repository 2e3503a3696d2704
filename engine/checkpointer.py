"""The trainer's checkpoints: find the newest verified one, resume from it (at any world size), save atomically.

File format and guarantees live in engine/checkpoint.py (complete-or-absent dirs, manifests, quarantine); this
component adds the run's side: which config keys must match to resume, the DeepSpeed engine's save and load, the
ranks agreeing on every phase, and the retry policy of failed writes.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.checkpoint import (
    BYTES_PER_PARAM,
    check_free_space,
    checkpoint_bytes,
    clean_stale,
    complete_checkpoints,
    discard_partial,
    finalize,
    find_resumable,
    tag_for,
    to_universal,
)
from engine.config.schema import Config
from engine.distributed import Collectives, is_collective_error
from engine.errors import CheckpointError
from engine.hooks import Hooks
from engine.metrics import MetricsWriter

log = logging.getLogger("flowopd")

# Config keys whose change makes a checkpoint unusable for resuming (the student's shape and its base).
RESUME_KEYS = ("model", "student")
# A failed checkpoint write (disk full, I/O error) keeps the previous checkpoint and training goes on, retrying
# at the next `save_every`; this many failures in a row, or a failed final save, stop the run.
MAX_SAVE_FAILURES = 3


def resume_digest(config: Config) -> str:
    """What must not change between a checkpoint and the run resuming from it."""
    return json.dumps({k: asdict(getattr(config, k)) for k in RESUME_KEYS}, sort_keys=True)


class Checkpointer:
    """Checkpoints of one run dir (`<output_dir>/checkpoints`), shared by all ranks of the run."""

    def __init__(self, config: Config, comm: Collectives, hooks: Hooks):
        self.config, self.comm, self.hooks = config, comm, hooks
        self.root = Path(config.output_dir) / "checkpoints"
        self.save_failures = 0
        if comm.rank == 0:
            for stale in clean_stale(self.root):
                log.info("removed %s (left by an interrupted checkpoint write; never loaded)", stale)

    def find(self) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0 picks the newest verified checkpoint (moving corrupt ones aside) and tells the other ranks,
        so every rank loads the same one and the files are hashed once."""
        found = find_resumable(self.root, quarantine=True) if self.comm.rank == 0 else None
        found = self.comm.broadcast(found)
        if found is not None and found[1].get("resume_digest") != resume_digest(self.config):
            raise CheckpointError(
                f"checkpoint {found[0]} was written with a different model/student config; resume it with the same "
                f"[model] and [student] settings (see {Path(self.config.output_dir) / 'config.toml'}) or use a new "
                f"--output-dir"
            )
        return found

    def check_free_space(self, trainable: int) -> None:
        """Fail before the first step when the file system cannot take one more checkpoint + export."""
        existing = complete_checkpoints(self.root)
        need = checkpoint_bytes(existing[0]) if existing else trainable * BYTES_PER_PARAM + (1 << 20)
        check_free_space(self.root, need + 2 * 4 * trainable, self.config.train.keep_checkpoints)

    def load(self, engine: Any, found: tuple[Path, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Load `found` into the DeepSpeed engine; (the step it resumes at, the client state)."""
        ckpt, meta = found
        saved_world = int(meta.get("world_size", self.comm.world))
        load_dir, cleanup = ckpt.parent, None
        if saved_world != self.comm.world:
            # ZeRO-2 optimizer state is partitioned per rank; DeepSpeed refuses to re-partition a plain ZeRO
            # checkpoint, but loads its universal form at any world size (exactly: same Adam moments and fp32
            # master weights, tests/test_reliability_distributed.py).
            load_dir = cleanup = ckpt.parent / "universal.partial"
            if self.comm.rank == 0:
                log.warning("checkpoint %s was written by %d ranks; this run has %d: converting it to DeepSpeed's "
                            "universal format to re-partition the optimizer state", ckpt, saved_world,
                            self.comm.world)
                shutil.rmtree(cleanup, ignore_errors=True)
                to_universal(ckpt, cleanup)
            self.comm.barrier()
            per_rank = self.config.train.prompts_per_step
            before = meta.get("prompts_per_rank", per_rank) * saved_world
            now = per_rank * self.comm.world
            if before != now and self.comm.rank == 0:
                log.warning("global batch changes from %d to %d prompts per micro-batch (train.prompts_per_step x "
                            "ranks): the run continues, but not the curve it would have had", before, now)
        load_path, client = engine.load_checkpoint(str(load_dir), tag=ckpt.name, load_module_strict=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
        if cleanup is not None:
            self.comm.barrier()
            if self.comm.rank == 0:
                shutil.rmtree(cleanup, ignore_errors=True)
        if self.comm.rank == 0:
            log.info("resumed from %s at step %d", ckpt, int(meta["step"]))
        return int(meta["step"]), client or {}

    def save(self, engine: Any, next_step: int, client_state: dict[str, Any], metrics: MetricsWriter | None,
             final: bool = False) -> bool:
        """Write checkpoint `step_<next_step>`; True when it is complete on disk.

        A write that fails on any rank (disk full, I/O error) leaves the previous checkpoint as the newest
        complete one; the partial dir is removed, the failure logged, and training goes on (the next save
        retries). After MAX_SAVE_FAILURES failures in a row, or when the final save fails, CheckpointError stops
        the run: re-running the same command then resumes from the kept checkpoint. Every line of `metrics` (rank 0's
        writer) must be on disk before the checkpoint may be finalised: a checkpoint never gets ahead of
        metrics.jsonl, or a resume from it would lose those lines."""
        tag = tag_for(next_step)
        meta = {"step": next_step, "resume_digest": resume_digest(self.config), "world_size": self.comm.world,
                "prompts_per_rank": self.config.train.prompts_per_step}
        error: BaseException | None = None
        writer = engine.checkpoint_engine
        plain = type(writer).save.__get__(writer)
        wrapped = self.hooks.wrap_writer(next_step, plain)
        if wrapped is not plain:
            writer.save = wrapped
        try:
            engine.save_checkpoint(str(self.root), tag=f"{tag}.partial", save_latest=False,
                                   exclude_frozen_parameters=True, client_state={"step": next_step, **client_state})
        except (OSError, RuntimeError) as exc:  # torch.save into a full disk raises RuntimeError ("unexpected pos")
            if is_collective_error(exc):
                raise
            # every file write sits between DeepSpeed's opening collectives and its closing barrier, so the
            # failed rank stands in for that barrier and the ranks stay in step
            error = exc
            self.comm.barrier()
        finally:
            writer.__dict__.pop("save", None)
        try:
            if error is None:
                self.hooks.hit("ckpt.saved", next_step)
        except OSError as exc:
            error = exc
        if error is None and metrics is not None and not metrics.flush():
            error = OSError(f"lines of {metrics.path} are not on disk yet")
        ok = self.comm.all_ranks(error is None)
        if ok and self.comm.rank == 0:
            try:
                finalize(self.root, tag, meta, self.config.train.keep_checkpoints,
                         functools.partial(self.hooks.hit, step=next_step))
            except (OSError, CheckpointError) as exc:
                error = exc
        ok = self.comm.all_ranks(ok and error is None)
        if ok:
            self.save_failures = 0
            return True
        self.save_failures += 1
        kept = "none yet"
        if self.comm.rank == 0:
            discard_partial(self.root, tag)
            newest = complete_checkpoints(self.root)
            kept = str(newest[0]) if newest else "none yet"
        cause = f"disk full or I/O error? {type(error).__name__}: {error}" if error else "failed on another rank"
        what = f"checkpoint {tag} could not be written ({cause}); newest complete checkpoint: {kept}"
        if final or self.save_failures >= MAX_SAVE_FAILURES:
            raise CheckpointError(f"{what}. {self.save_failures} failed save(s) in a row; stopping. Free space or "
                                  f"fix {self.root}, then re-run the same command to resume from the kept checkpoint")
        log.error("%s; training continues and retries at the next checkpoint (%d/%d failures in a row)", what,
                  self.save_failures, MAX_SAVE_FAILURES)
        return False

