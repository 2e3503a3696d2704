"""The trainer's checkpoints: find the newest verified one, resume from it (at any world size), save atomically.

File format and guarantees live in engine/checkpoint.py (complete-or-absent dirs, manifests, quarantine); this
component adds the run's side: the config stored with each checkpoint and what a re-run may change
(engine/resume.py), loading without unpickling code (engine/safe_load.py), the DeepSpeed engine's save and load, the
ranks agreeing on every phase, and the retry policy of failed writes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from engine.checkpoint import (
    check_free_space,
    checkpoint_bytes,
    clean_stale,
    complete_checkpoints,
    discard_partial,
    estimate_bytes,
    finalize,
    find_resumable,
    free_name,
    quarantine_dir,
    quarantined,
    scan_pickles,
    tag_for,
    to_universal,
)
from engine.config.io import from_dict, to_toml
from engine.config.schema import Config
from engine.distributed import Collectives, is_collective_error
from engine.errors import CheckpointError
from engine.files import write_atomic
from engine.hooks import Hooks
from engine.metrics import MetricsWriter, logged_steps
from engine.resume import ResumePolicy, config_changes, stored_config
from engine.safe_load import UnsafeCheckpointError, only_safe_loads

log = logging.getLogger("flowopd")

# A failed checkpoint write (disk full, I/O error) keeps the previous checkpoint and training goes on, retrying
# at the next `save_every`; this many failures in a row, or a failed final save, stop the run.
MAX_SAVE_FAILURES = 3


class Checkpointer:
    """Checkpoints of one run dir (`<output_dir>/checkpoints`), shared by all ranks of the run."""

    def __init__(self, config: Config, comm: Collectives, hooks: Hooks, policy: ResumePolicy | None = None):
        self.config, self.comm, self.hooks = config, comm, hooks
        self.policy = policy or ResumePolicy()
        self.out = Path(config.output_dir)
        self.root = self.out / "checkpoints"
        self.save_failures = 0
        if comm.rank == 0:
            for stale in clean_stale(self.root):
                log.info("removed %s (left by an interrupted checkpoint write; never loaded)", stale)

    def find(self) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0 picks the newest verified checkpoint (moving corrupt ones aside), vets its pickles and its config
        against this run's, and tells the other ranks, so every rank loads the same one and the files are hashed
        once. Raises CheckpointError (on every rank) when the run must not go on as asked."""
        verdict = None
        if self.comm.rank == 0:
            try:
                verdict = self._choose()
            except (OSError, CheckpointError) as exc:  # told to every rank: the others wait in the broadcast
                verdict = None, f"cannot resume from {self.root}: {exc}"
        found, error = self.comm.broadcast(verdict)
        if error is not None:
            raise CheckpointError(error)
        return found

    def _choose(self) -> tuple[tuple[Path, dict[str, Any]] | None, str | None]:
        """Rank 0's (checkpoint to resume, None) or (None, why the run must stop)."""
        found = find_resumable(self.root, quarantine=True)
        if found is None:
            return None, self._fresh_start()
        ckpt, meta = found
        try:
            scan_pickles(ckpt)
        except UnsafeCheckpointError as exc:
            bad = quarantine_dir(ckpt)
            return None, (f"checkpoint {ckpt}: {exc}. It was moved to {bad} and will not be tried again; nothing was "
                          f"resumed. Inspect it (never with torch.load(weights_only=False)), or re-run to resume from "
                          f"an older checkpoint")
        stored = stored_config(meta)
        if stored is None:
            log.warning("checkpoint %s stores no config to compare with; resuming with this run's config", ckpt)
            return found, None
        changes = config_changes(*stored, self.config, (int(meta.get("world_size", 1)), self.comm.world))
        refused = [c for c in changes if c.kind == "trajectory"]
        if refused and not self.policy.allow_config_change:
            listed = "\n  ".join(str(c) for c in refused)
            return None, (f"checkpoint {ckpt} (step {meta['step']}) was trained with another config; resuming "
                          f"would mix two runs. Changed (checkpoint -> now):\n  {listed}\nResume with the "
                          f"checkpoint's values ({self.out / 'config.toml'} is unchanged), use another --output-dir, "
                          f"or pass --allow-config-change to go on with the new values (each change is logged and "
                          f"the old config kept as config.step_{meta['step']}.toml)")
        for c in changes:
            level = logging.INFO if c.kind == "operational" else logging.WARNING
            note = {"trajectory": "allowed by --allow-config-change: the run continues with the new value",
                    "implementation": "same computation another way: no longer bit-exact with an uninterrupted run",
                    "operational": "does not change what a step computes"}[c.kind]
            log.log(level, "resuming %s with a changed config: %s (%s)", ckpt.name, c, note)
        if refused:
            kept = self.out / f"config.step_{int(meta['step'])}.toml"
            if isinstance(meta.get("config"), dict):
                write_atomic(kept, to_toml(from_dict(Config, meta["config"], "", [])))
            elif (self.out / "config.toml").is_file():  # a legacy checkpoint: the run dir's record is the best left
                shutil.copyfile(self.out / "config.toml", kept)
            log.warning("the config checkpoint %s was trained with is kept as %s", ckpt.name, kept)
        return found, None

    def _fresh_start(self) -> str | None:
        """No checkpoint to resume: None when starting at step 0 loses nothing, else why it would (the run stops
        unless --restart). Losing something = metrics.jsonl holds a step at or past the first checkpoint (so a
        checkpoint existed and is gone, or its save failed), or checkpoints were moved aside as corrupt."""
        metrics = self.out / "metrics.jsonl"
        steps = logged_steps(metrics)
        c = self.config.train
        first = c.save_every or c.steps
        corrupt = quarantined(self.root)
        if not corrupt and (not steps or max(steps) < first):
            return None  # killed before the first checkpoint: every logged step is redone identically
        evidence = " and ".join(
            ([f"checkpoints were moved aside as corrupt ({', '.join(p.name for p in corrupt)})"] if corrupt else [])
            + ([f"{metrics} holds {len(steps)} logged steps ({min(steps)}..{max(steps)})"] if steps else []))
        if not self.policy.restart:
            return (f"no complete checkpoint in {self.root}, but {evidence}: starting over would train from step 0 "
                    f"and replace that history. Restore a checkpoint into {self.root}, or re-run with --restart to "
                    f"start over (metrics.jsonl is then kept as metrics.before-restart.jsonl)")
        log.warning("--restart: no complete checkpoint, but %s; training from step 0", evidence)
        if metrics.exists():
            kept = free_name(self.out / "metrics.before-restart.jsonl")
            os.replace(metrics, kept)
            log.warning("the old metrics.jsonl is kept as %s", kept)
        return None

    def check_free_space(self, engine: Any) -> int:
        """Fail before the first step when the file system cannot take one more checkpoint + export; returns the
        bytes one checkpoint takes (an existing one's size, else counted from what DeepSpeed will write)."""
        trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        existing = complete_checkpoints(self.root)
        need = (checkpoint_bytes(existing[0]) if existing else
                estimate_bytes(engine.module_state_dict(exclude_frozen_parameters=True), trainable))
        check_free_space(self.root, need + 2 * 4 * trainable, self.config.train.keep_checkpoints)
        return need

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
        with only_safe_loads():  # DeepSpeed's loaders call torch.load(weights_only=False) themselves
            load_path, client = engine.load_checkpoint(str(load_dir), tag=ckpt.name, load_module_strict=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
        if cleanup is not None:
            self.comm.barrier()
            if self.comm.rank == 0:
                shutil.rmtree(cleanup, ignore_errors=True)
        self._apply_hyperparameters(engine)
        if self.comm.rank == 0:
            log.info("resumed from %s at step %d", ckpt, int(meta["step"]))
        return int(meta["step"]), client or {}

    def _apply_hyperparameters(self, engine: Any) -> None:
        """The run's config, not the checkpoint, sets the optimizer's hyperparameters: `load_checkpoint` restores the
        saved param groups (lr, betas, eps, weight decay), the scheduler's base lr and ZeRO's clip value. The same
        numbers unless --allow-config-change let them differ (measured: without this, a resumed run kept the old lr
        while config.toml claimed the new one)."""
        t = self.config.train
        scheduler, groups = engine.lr_scheduler, engine.optimizer.param_groups
        scheduler.base_lrs = [t.lr] * len(groups)
        lrs = [t.lr * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]  # what scheduler.step() computed
        for group, lr in zip(groups, lrs):
            group.update(lr=lr, initial_lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        scheduler._last_lr = lrs
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = t.grad_clip

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
        meta = {"step": next_step, "config": dataclasses.asdict(self.config), "world_size": self.comm.world,
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
