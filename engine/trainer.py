"""The OPD loop: rollout -> query states -> field targets -> student loss -> DeepSpeed step -> log/checkpoint.

The trainer wires components and owns the loop: the model family's backend and the student builder
(engine/student.py), the prompt data, the field evaluator, the rollout runner, the OPD objective (query chunks ->
transitions -> targets -> loss), DeepSpeed (engine/ds_config.py), the checkpointer and the metrics file. One
optimizer step = `train.grad_accum` rollout micro-batches; each micro-batch's query states are scored in q chunks,
and each chunk is one DeepSpeed micro-step (gradient_accumulation_steps = grad_accum * q), so DeepSpeed owns loss
scaling, gradient reduction, clipping and the optimizer step, and the loss of a step is the mean over all its query
states.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from engine import ops
from engine.adapters.export import clean_stale_exports
from engine.adapters.lora import STUDENT, freeze_for_training
from engine.backends import get_backend
from engine.backends.base import TensorCond
from engine.checkpointer import Checkpointer
from engine.config.io import deepspeed_json, to_toml
from engine.config.schema import Config
from engine.data.cache import load_or_build
from engine.data.images import row_conditioning
from engine.data.prompts import load_prompts
from engine.data.sampler import PromptSampler
from engine.data.text import build_text_encoder
from engine.distributed import Collectives, after_engine_init, init_distributed
from engine.ds_config import deepspeed_config, read_deepspeed_json
from engine.ema import StudentEMA
from engine.fields.evaluator import FieldEvaluator, PeftFieldEvaluator
from engine.fields.field import Field, student_field
from engine.files import RunDirLock, write_atomic
from engine.hooks import hooks_from_env
from engine.metrics import MetricsWriter
from engine.objective import ChunkResult, MicroBatch
from engine.objectives import build_objective, chunks_of
from engine.opd.routing import NoRouting, Router
from engine.profiling import CudaProfilerWindow, PhaseTimer
from engine.resume import ResumePolicy
from engine.sampling.rollout import EagerRollout, Rollout
from engine.student import build_student, export_student, load_full_teachers
from engine.watchdog import StepWatchdog

log = logging.getLogger("flowopd")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingView(Protocol):
    """What a step callback may read of the running trainer."""

    rank: int
    device: torch.device
    last_logged: dict[str, Any] | None
    """The metrics row written to metrics.jsonl by the step just finished (None when it was not logged)."""

    def student_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond,
                         cfg_scale: float = 1.0) -> torch.Tensor:
        """The live student's velocity, CFG-guided by `cfg_scale` (1.0 = unguided)."""
        ...


StepCallback = Callable[[TrainingView, int], None]
"""`cb(view, finished_steps)`: see Trainer.train (a miniature world's reward curve is one)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` as a torch dtype (`auto`: bfloat16 on CUDA, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class Trainer:
    """One run of one student: build everything from the config, resume if a checkpoint exists, train, export."""

    def __init__(self, config: Config, resume: ResumePolicy | None = None):
        import deepspeed

        self.config = c = config
        self.rank, self.world, local_rank = init_distributed()
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(c.model.dtype, self.device)
        self.out = Path(c.output_dir)
        self.timer = PhaseTimer(self.device, sync=c.train.phase_timing)
        self.comm = Collectives(self.rank, self.world, self.device)
        ops.configure(c.kernels.default, c.kernels.backends)
        self.hooks = hooks_from_env(self.rank)
        self.lock: RunDirLock | None = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunDirLock(self.out)
            for stale in clean_stale_exports(self.out / "export"):
                log.info("removed %s (left by an interrupted export)", stale)
        self.checkpointer = Checkpointer(c, self.comm, self.hooks, resume)
        self.resume_from = self.checkpointer.find()
        if self.rank == 0:  # only now: a re-run refused above leaves the record of the run it would have mixed with
            write_atomic(self.out / "config.toml", to_toml(c))

        # ---- model, data (embeddings cached once: rank 0 builds, the others read)
        self.backend = get_backend(c.model.family)
        model, self.spec = build_student(c, self.backend)
        self.prompts = load_prompts(c.data.prompts)
        self.router = NoRouting() if c.rl.loss else Router(c.opd, self.prompts, c.train.seed)
        encoder = build_text_encoder(c.data.encoder, self.backend, self.spec, c.data.max_sequence_length)
        cache = Path(c.data.cache) if c.data.cache else self.out / "prompt_cache.safetensors"
        texts = [p.text for p in self.prompts if not p.source]  # edit rows: engine.data.images caches their captions
        if self.rank == 0:
            self.embeddings = load_or_build(encoder, texts, cache, self.backend.cond_type, self.dtype)
        self.comm.barrier()
        if self.rank != 0:
            self.embeddings = load_or_build(encoder, texts, cache, self.backend.cond_type, self.dtype)
        self.conditioning = row_conditioning(c, self.backend, self.spec, self.prompts, encoder, self.embeddings,
                                             self.out, self.rank, self.comm.broadcast, self.dtype)
        self.sampler = PromptSampler(self.prompts, c.train.seed, c.train.prompts_per_step, c.rollout.group_size,
                                     c.train.grad_accum, self.world, self.rank, c.data.task_weights or None)
        self.sigmas = self.backend.sigmas(c.rollout.steps, c.rollout.shift).to(self.device)
        self.rows = c.train.prompts_per_step * c.rollout.group_size

        # ---- DeepSpeed
        params = freeze_for_training(model, STUDENT)
        optimizer = torch.optim.AdamW(params, lr=c.train.lr, betas=tuple(c.train.betas), eps=c.train.eps,
                                      weight_decay=c.train.weight_decay)
        warmup = c.train.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        chunks = chunks_of(c)
        universal = (self.resume_from is not None
                     and int(self.resume_from[1].get("world_size", self.world)) != self.world)
        ds = deepspeed_config(read_deepspeed_json(deepspeed_json(c)), rows=self.rows,
                              micro_steps=c.train.grad_accum * chunks, world=self.world, grad_clip=c.train.grad_clip,
                              dtype=self.dtype, universal=universal)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        after_engine_init(self.world)
        self.model = self.engine.module
        self.model.eval()  # SD3 has no dropout; eval() keeps peft's lora_dropout (0) and norms inert
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = (StudentEMA(trainable, c.train.ema_decay, c.train.ema_every, c.train.ema_repeats)
                    if c.train.ema_decay > 0 else None)

        # ---- fields, rollout, objective
        self.uncond = self.embeddings.uncond.to(self.device)
        self.full_teachers = load_full_teachers(c, self.backend, self.device, self.dtype)
        self.fields = {f.name: Field(f.name, None if f.source == "base" else f.source, f.cfg_scale, f.operator)
                       for f in c.fields}
        self.evaluator = self._build_evaluator()
        self.rollout = self._build_rollout()
        self.objective = build_objective(c, self.evaluator, self.fields, self.sigmas, self.timer.range, self.backend,
                                         self.spec, self.comm, mix=self.router.mix, params=trainable)

        # ---- resume
        self.start_step = 0
        self.nonfinite_streak = 0
        if self.resume_from is not None:
            self.start_step, client = self.checkpointer.load(self.engine, self.resume_from)
            self.load_state_dict(client)
        if self.rank == 0:
            self.checkpointer.check_free_space(self.engine)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", self.start_step) if self.rank == 0 else None
        self.last_logged: dict[str, Any] | None = None
        self.profiler = CudaProfilerWindow(c.train.profile_steps)
        self.watchdog = StepWatchdog(self.rank, self.world, self.timer, c.train.step_timeout)

    # ------------------------------------------------------------------------------------------ setup

    def _build_evaluator(self) -> FieldEvaluator:
        fields = [*self.fields.values(), student_field(self.config.rollout.cfg_scale)]
        velocity = self.backend.velocity
        if self.config.opd.evaluator == "batched":
            from engine.fields.batched import BatchedFieldEvaluator

            return BatchedFieldEvaluator(self.model, velocity, fields, self.uncond,
                                         merge_rows=self.config.kernels.lora_merge_rows, models=self.full_teachers)
        return PeftFieldEvaluator(self.model, velocity, fields, self.uncond, self.full_teachers)

    def _build_rollout(self) -> Rollout:
        c = self.config
        student = student_field(c.rollout.cfg_scale)
        shape = self.spec.latent_shape
        eager = EagerRollout(self.evaluator, student, sampler=c.rollout.sampler, noise_level=c.rollout.noise_level,
                             seed=c.train.seed, latent_shape=shape, device=self.device)
        if c.kernels.cuda_graphs:  # in-kernel Philox step noise, still keyed by (seed, sample id, step)
            from engine.sampling.rollout_graph import GraphRollout, RolloutRunner

            runner = RolloutRunner(self.model, student, self.uncond, velocity=self.backend.velocity,
                                   sampler=c.rollout.sampler, noise_level=c.rollout.noise_level,
                                   switch=self.evaluator.switch)
            return GraphRollout(runner, seed=c.train.seed, latent_shape=shape, device=self.device, mixed=eager)
        return eager

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own resume state beside DeepSpeed's (the client state of a checkpoint)."""
        return {"nonfinite_streak": self.nonfinite_streak, **({"ema": self.ema.state_dict()} if self.ema else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` from a checkpoint's client state."""
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # EMA switched on in a resumed run: it starts from the resumed weights
            log.warning("checkpoint has no EMA (train.ema_decay was 0 when it was written): the EMA starts now")

    def ema_weights(self) -> AbstractContextManager:
        """The EMA weights in the student inside the block when `train.ema_decay` > 0 (else a no-op)."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    @property
    def save_failures(self) -> int:
        """Failed checkpoint writes in a row (the checkpointer's count)."""
        return self.checkpointer.save_failures

    def student_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond,
                         cfg_scale: float = 1.0) -> torch.Tensor:
        """The live student's velocity through the run's field evaluator, CFG-guided by `cfg_scale` (what step
        callbacks sample with)."""
        return self.evaluator.field_velocity(student_field(cfg_scale), x, sigma, cond)

    # ------------------------------------------------------------------------------------------- loop

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step: every micro-batch's rollout and query chunks; returns its metrics row."""
        c = self.config
        t0 = time.perf_counter()
        draw = self.router.draw(step)
        sums: dict[str, torch.Tensor] = {}
        per_field: dict[str, list[torch.Tensor]] = {}
        # inspected only when the step turns out non-finite, so a healthy step adds no host sync
        checks: list[ChunkResult] = []
        data_crc = 0
        skipped_before = self.engine.skipped_steps
        micros: list[MicroBatch] = []  # every micro-batch is rolled out before any is trained (engine/objective.py)
        for micro in range(c.train.grad_accum):
            batch = self.sampler.batch(step, micro, draw.pool, draw.key, draw.pool_step)
            data_crc = zlib.crc32(json.dumps(batch.sample_ids).encode(), data_crc)
            routes = self.router.route(step, batch.tasks)
            cond = self.conditioning.rows(batch.prompt_ids).to(self.device, non_blocking=True)
            with self.timer.range("rollout", "green"):
                self.hooks.hit("step.rollout", step)
                traj = self.objective.states(self.rollout, cond, batch.sample_ids, routes, step)
            micros.append(MicroBatch(micro, batch.sample_ids, batch.prompt_ids, batch.texts, batch.tasks, routes,
                                     cond, traj))
        logged = self.objective.prepare(step, micros)
        for m in micros:
            queries = self.objective.queries(m, c.train.seed, step)
            for j in range(self.objective.chunks):
                res = self.objective.chunk(m, queries, j, self.engine.backward, step)
                with self.timer.range("optimizer", "purple"):
                    self.engine.step()
                checks.append(res)
                for k, v in res.out.terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                for name, v in res.per_field.items():
                    per_field.setdefault(name, []).append(v)
        n = c.train.grad_accum * self.objective.chunks
        sums = self.comm.mean(sums)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        elapsed = time.perf_counter() - t0
        row: dict[str, Any] = {
            "step": step,
            **{k: float(v) / n for k, v in sums.items()},
            **{f"field/{k}": float(torch.stack(v).mean()) for k, v in per_field.items()},
            **logged,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": grad_norm,
            "images_per_s": self.rows * c.train.grad_accum * self.world / elapsed,
            "step_s": elapsed,
            **{f"time/{k}": v for k, v in self.timer.pop().items()},
            "data_crc": data_crc,
        }
        # loss terms and grad norm are global (all-reduced), so every rank takes the same branch here
        finite = math.isfinite(grad_norm) and all(math.isfinite(float(v)) for v in sums.values())
        row["skipped"] = self.engine.skipped_steps != skipped_before
        if finite and row["skipped"]:
            log.warning("step %d: DeepSpeed skipped the update (loss-scale overflow)", step)
        if finite:
            self.nonfinite_streak = 0
        else:
            row["nonfinite_fields"] = self._nonfinite(step, checks, row["skipped"])
        return row

    def _nonfinite(self, step: int, checks: list[ChunkResult], skipped: bool) -> list[str]:
        """Name the culprits of a non-finite step, count it, stop after `train.max_nonfinite` in a row."""
        c = self.config
        culprits = self._nonfinite_culprits(checks)
        if not skipped:  # cannot happen with compute_grad_norm on; never continue from a corrupt student
            raise FloatingPointError(f"step {step}: non-finite loss/gradient ({', '.join(culprits)}) but the "
                                     f"optimizer applied the update; resume from the last checkpoint")
        self.nonfinite_streak += 1
        log.warning("step %d: non-finite loss/gradient from %s; the update was skipped (%d in a row, limit "
                    "train.max_nonfinite = %d)", step, ", ".join(culprits), self.nonfinite_streak,
                    c.train.max_nonfinite)
        if self.nonfinite_streak >= c.train.max_nonfinite:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive steps with non-finite loss or gradients (last at step "
                f"{step}, from {', '.join(culprits)}); stopping. Check those teachers/fields, or lower "
                f"train.lr if it is the gradient."
            )
        return culprits

    def _field_label(self, name: str) -> str:
        """`field (teacher adapter)` for logs; the base model for fields with adapters disabled."""
        f = self.fields.get(name)
        source = "base model" if f is None or f.adapter is None else f"teacher {f.adapter}"
        return f"{name} ({source})"

    def _nonfinite_culprits(self, checks: list[ChunkResult]) -> list[str]:
        """Which fields (and teachers) produced non-finite targets this step, on any rank; else `student` (its
        own velocity), else `loss` / `gradient` (finite inputs, non-finite result)."""
        bad: set[str] = set()
        for res in checks:
            bad.update(self._field_label(r) for r, ok in zip(res.rows, res.target_ok.tolist()) if not ok)
            if not bool(res.student_ok.all()):
                bad.add("student")
        bad = self.comm.union(sorted(bad))
        return sorted(bad) or ["loss/gradient (all field and student velocities were finite)"]

    def save_checkpoint(self, next_step: int, final: bool = False) -> bool:
        """Write checkpoint `step_<next_step>` (engine/checkpointer.py); True when it is complete on disk."""
        with self.timer.range("checkpoint", "gray"):
            return self.checkpointer.save(self.engine, next_step, self.state_dict(), self.metrics, final)

    def export(self) -> Path | None:
        """Rank 0 writes the student to `<output_dir>/export` (PEFT dir + the family's diffusers file)."""
        if self.rank != 0:
            return None
        with self.ema_weights():
            return export_student(self.model, self.out / "export", self.backend)

    def train(self, callbacks: Sequence[StepCallback] = ()) -> list[dict[str, Any]]:
        """Run the remaining steps. Each callback is called as `cb(trainer, n)` with the number of finished steps:
        once before the first step of a fresh run (n = 0) and after every step, before that step's checkpoint."""
        from tqdm import tqdm

        c = self.config.train
        rows = []
        bar = tqdm(range(self.start_step, c.steps), initial=self.start_step, total=c.steps, desc="opd",
                   disable=self.rank != 0, dynamic_ncols=True)
        if self.start_step == 0:
            with self.ema_weights():
                for cb in callbacks:
                    cb(self, 0)
        self.watchdog.start()
        try:
            self._loop(bar, callbacks, rows)
        finally:
            self.watchdog.stop()
        self.export()
        self.comm.barrier()
        return rows

    def _loop(self, steps: Any, callbacks: Sequence[StepCallback], rows: list[dict[str, Any]]) -> None:
        """The steps of `train`, each watched by the watchdog from its start to the end of its checkpoint."""
        c = self.config.train
        for step in steps:
            self.watchdog.begin(step)
            self.hooks.hit("step.begin", step)
            self.profiler.before_step(step)
            row = self.train_step(step)
            if self.ema is not None:
                self.ema.update(step + 1)
            self.profiler.after_step(step)
            rows.append(row)
            self.hooks.hit("step.end", step)
            self.last_logged = None
            if self.metrics is not None and (step % c.log_every == 0 or step + 1 == c.steps):
                self.metrics.write(row)
                self.last_logged = row  # what the trackers see (engine/eval/callbacks.py)
            self.hooks.hit("step.logged", step)
            steps.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_s=f"{row['images_per_s']:.1f}")
            with self.ema_weights():  # the world's reward curve scores what eval and export use
                for cb in callbacks:
                    cb(self, step + 1)
            if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == c.steps:
                self.save_checkpoint(step + 1, final=step + 1 == c.steps)
            self.watchdog.end(step)

    def close(self) -> None:
        """Close the metrics and prompt-cache files and release the run-dir lock."""
        self.embeddings.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
