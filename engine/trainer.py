"""The OPD loop: rollout -> query states -> field targets -> student loss -> DeepSpeed step -> log/checkpoint.

One optimizer step = `train.grad_accum` rollout micro-batches; each micro-batch's query states are scored
in q chunks (one query slot of every sample per chunk), and each chunk is one DeepSpeed micro-step
(gradient_accumulation_steps = grad_accum * q), so DeepSpeed owns loss scaling, gradient reduction,
clipping and the optimizer step, and the loss of a step is the mean over all its query states.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine import dispatch, faults, rng
from engine.checkpoint import (
    BYTES_PER_PARAM,
    CheckpointError,
    RunDirLock,
    check_free_space,
    checkpoint_bytes,
    clean_stale,
    complete_checkpoints,
    discard_partial,
    finalize,
    find_resumable,
    tag_for,
    to_universal,
    write_atomic,
)
from engine.config import Config, ConfigError, resolve_path, to_toml
from engine.data.cache import load_or_build
from engine.data.encoders import build_encoder
from engine.data.prompts import load_prompts
from engine.data.sampler import PromptSampler
from engine.metrics import MetricsWriter
from engine.models.export import export_adapter
from engine.models.loading import build_preset, load_transformer, preset_from_model
from engine.models.lora import STUDENT, LoraSpec, add_adapter, freeze_for_training, load_adapter, load_teachers
from engine.models.merge import merge_into_student
from engine.models.presets import get_preset
from engine.opd.fields import Field, FieldEvaluator, student_field
from engine.opd.losses import Transition, opd_loss
from engine.opd.query import select_queries
from engine.opd.routing import Router
from engine.profiling import CudaProfilerWindow, PhaseTimer
from engine.sampling.rollout import PhiloxNoise, SampleNoise, rollout
from engine.sampling.rollout_graph import RolloutRunner
from engine.sampling.schedule import flow_match_sigmas

log = logging.getLogger("flowopd")

StepCallback = Callable[["Trainer", int], None]
"""`cb(trainer, finished_steps)`: see Trainer.train (the toy world's reward curve is one)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config keys whose change makes a checkpoint unusable for resuming (the student's shape and its base).
RESUME_KEYS = ("model", "student")
# Seconds a rank waits in a collective (and at start-up rendezvous) before giving up on a dead or stuck peer.
# torch's gloo default is 30 min; it must exceed the longest legitimate wait: rank 0 building the prompt cache
# or fsyncing + hashing a checkpoint while the others wait at a barrier.
DIST_TIMEOUT_ENV = "FLOWOPD_DIST_TIMEOUT"
DIST_TIMEOUT_S = 1800.0
# A failed checkpoint write (disk full, I/O error) keeps the previous checkpoint and training goes on, retrying
# at the next `save_every`; this many failures in a row, or a failed final save, stop the run.
MAX_SAVE_FAILURES = 3


def dist_timeout() -> datetime.timedelta:
    raw = os.environ.get(DIST_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DIST_TIMEOUT_S
        if seconds <= 0:
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


def _init_distributed() -> tuple[int, int, int]:
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _resume_digest(config: Config) -> str:
    return json.dumps({k: asdict(getattr(config, k)) for k in RESUME_KEYS}, sort_keys=True)


class Trainer:
    def __init__(self, config: Config):
        import deepspeed

        self.config = c = config
        self.rank, self.world, local_rank = _init_distributed()
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(c.model.dtype, self.device)
        self.out = Path(c.output_dir)
        self.timer = PhaseTimer(self.device)
        dispatch.set_backend("*", c.kernels.default)
        for op in ("sde_step", "ode_step", "sde_step_indexed", "ode_step_indexed"):
            dispatch.set_backend(op, c.kernels.sde_step)
        self.faults = faults.from_env(self.rank)  # None unless a reliability test injects faults
        self.lock: RunDirLock | None = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunDirLock(self.out)
            write_atomic(self.out / "config.toml", to_toml(c))
            for stale in clean_stale(self.out / "checkpoints"):
                log.info("removed %s (left by an interrupted checkpoint write; never loaded)", stale)
        self.resume_from = self._find_checkpoint()

        # ---- data: prompts with task tags, routed; embeddings cached once (rank 0 builds, others read)
        self.prompts = load_prompts(c.data.prompts)
        self.router = Router(c.opd, self.prompts, c.train.seed)
        model, preset = self._build_model()
        self.preset = preset
        encoder = build_encoder(c.data.encoder, preset if not c.model.path else None, c.data.max_sequence_length)
        cache = Path(c.data.cache) if c.data.cache else self.out / "prompt_cache.safetensors"
        if self.rank == 0:
            self.embeddings = load_or_build(encoder, [p.text for p in self.prompts], cache)
        self._barrier()
        if self.rank != 0:
            self.embeddings = load_or_build(encoder, [p.text for p in self.prompts], cache)
        self.sampler = PromptSampler(self.prompts, c.train.seed, c.train.prompts_per_step, c.rollout.group_size,
                                     c.train.grad_accum, self.world, self.rank, c.data.task_weights or None)

        # ---- schedule and query chunks
        self.sigmas = flow_match_sigmas(c.rollout.steps, c.rollout.shift).to(self.device)
        self.sigma_1 = float(self.sigmas[1])
        self.chunks = c.opd.query_states or (c.rollout.steps - 1)
        self.rows = c.train.prompts_per_step * c.rollout.group_size

        # ---- DeepSpeed
        params = freeze_for_training(model, STUDENT)
        optimizer = torch.optim.AdamW(params, lr=c.train.lr, betas=tuple(c.train.betas), eps=c.train.eps,
                                      weight_decay=c.train.weight_decay)
        warmup = c.train.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self._deepspeed_config())
        if self.world > 1:
            _apply_timeout_to_all_groups(dist_timeout())
        self.model = self.engine.module
        self.model.eval()  # SD3 has no dropout; eval() keeps peft's lora_dropout (0) and norms inert
        self.uncond = self.embeddings.uncond.to(self.device)
        self.fields = {f.name: Field(f.name, None if f.source == "base" else f.source, f.cfg_scale) for f in c.fields}
        self.evaluator = self._build_evaluator()
        self.runner = None  # kernels.cuda_graphs: captured rollout steps (eager `rollout` below is the reference)
        if c.kernels.cuda_graphs:
            self.runner = RolloutRunner(self.model, student_field(c.rollout.cfg_scale), self.uncond,
                                        sampler=c.rollout.sampler, noise_level=c.rollout.noise_level,
                                        switch=self.evaluator.switch)

        # ---- resume
        self.start_step = 0
        self.nonfinite_streak = 0
        self.save_failures = 0
        self._resume()
        if self.rank == 0:
            self._check_disk_space(params)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", self.start_step) if self.rank == 0 else None
        self.profiler = CudaProfilerWindow(c.train.profile_steps)

    # ------------------------------------------------------------------------------------------ setup

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def _build_model(self) -> tuple[torch.nn.Module, Any]:
        c = self.config
        if c.model.path:
            model = load_transformer(resolve_path(c.model.path), torch.float32)
            seq_len = 77 + c.data.max_sequence_length if c.data.encoder not in ("builtin", "toy") else None
            if c.data.encoder == "toy":
                from engine.toy.encoder import ToyTextEncoder

                seq_len = ToyTextEncoder.from_pretrained().seq_len
            preset = preset_from_model(model, seq_len or 0, c.model.latent_size or None)
        else:
            preset = get_preset(c.model.preset)
            model = build_preset(preset, c.model.init_seed, torch.float32)
        if c.model.latent_size:
            preset = type(preset)(preset.name, preset.transformer, preset.text_seq_len, c.model.latent_size)
        if c.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        s = c.student
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(c.train.seed, rng.INIT))
            try:
                add_adapter(model, STUDENT, LoraSpec(s.rank, s.alpha, tuple(s.targets), s.init))
            except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
                raise ConfigError([f"student.targets = {s.targets}: {exc}"]) from exc
        load_teachers(model, c.teachers, s.targets)
        if c.init.merge != "none":
            names = c.init.teachers or [t.name for t in c.teachers]
            off = [f"{n} (rank {model.peft_config[n].r})" for n in names if model.peft_config[n].r != s.rank]
            if c.init.merge == "average" and off:
                raise ConfigError([f"init.merge = 'average' averages A and B, so every merged teacher needs "
                                   f"student.rank = {s.rank}: {', '.join(off)}; use init.merge = 'svd'"])
            merge_into_student(model, names, c.init.merge, c.init.weights or None)
        elif c.init.adapter:
            load_adapter(model, "_init", resolve_path(c.init.adapter))
            merge_into_student(model, ["_init"], "svd", [1.0])
            model.delete_adapters("_init")
        if c.model.attention == "fused":
            from engine.models.attention import install_attention

            dispatch.set_backend("joint_attention", "triton")  # FLOWOPD_BACKEND[_JOINT_ATTENTION]=torch overrides
            install_attention(model, backend=c.model.attention_backend)
        return model, preset

    def _check_disk_space(self, params: list[torch.nn.Parameter]) -> None:
        """Fail before the first step when the output file system cannot take one more checkpoint + export."""
        root = self.out / "checkpoints"
        existing = complete_checkpoints(root)
        numel = sum(p.numel() for p in params)
        need = checkpoint_bytes(existing[0]) if existing else numel * BYTES_PER_PARAM + (1 << 20)
        check_free_space(root, need + 2 * 4 * numel, self.config.train.keep_checkpoints)

    def _build_evaluator(self) -> FieldEvaluator:
        fields = [*self.fields.values(), student_field(self.config.rollout.cfg_scale)]
        if self.config.opd.evaluator == "batched":
            from engine.models.multi_lora import BatchedFieldEvaluator

            return BatchedFieldEvaluator(self.model, fields, self.uncond)
        return FieldEvaluator(self.model, fields, self.uncond)

    def _deepspeed_config(self) -> dict[str, Any]:
        c = self.config
        path = Path(c.train.deepspeed)
        if not path.is_absolute() and not path.is_file():
            path = Path(__file__).resolve().parents[1] / path
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed: DeepSpeed config not found: {c.train.deepspeed}")
        ds = json.loads(path.read_text())
        ds["train_micro_batch_size_per_gpu"] = self.rows
        ds["gradient_accumulation_steps"] = c.train.grad_accum * self.chunks
        ds["train_batch_size"] = self.rows * c.train.grad_accum * self.chunks * self.world
        ds["gradient_clipping"] = c.train.grad_clip
        # a non-finite gradient norm is what makes ZeRO skip a step in fp32 (bf16/fp16 check overflow as well)
        ds.setdefault("zero_optimization", {})["compute_grad_norm"] = True
        if self.resume_from is not None and int(self.resume_from[1].get("world_size", self.world)) != self.world:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        ds.pop("bf16", None)
        ds.pop("fp16", None)
        if self.dtype == torch.bfloat16:
            ds["bf16"] = {"enabled": True}
        elif self.dtype == torch.float16:
            ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
        return ds

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0 picks the newest verified checkpoint (moving corrupt ones aside) and tells the other ranks,
        so every rank loads the same one and the files are hashed once."""
        import torch.distributed as dist

        found = find_resumable(self.out / "checkpoints", quarantine=True) if self.rank == 0 else None
        if self.world > 1:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if found is not None and found[1].get("resume_digest") != _resume_digest(self.config):
            raise CheckpointError(
                f"checkpoint {found[0]} was written with a different model/student config; resume it with the "
                f"same [model] and [student] settings (see {self.out / 'config.toml'}) or use a new --output-dir"
            )
        return found

    def _resume(self) -> None:
        if self.resume_from is None:
            return
        ckpt, meta = self.resume_from
        saved_world = int(meta.get("world_size", self.world))
        load_dir, cleanup = ckpt.parent, None
        if saved_world != self.world:
            # ZeRO-2 optimizer state is partitioned per rank; DeepSpeed refuses to re-partition a plain ZeRO
            # checkpoint, but loads its universal form at any world size (exactly: same Adam moments and fp32
            # master weights, tests/test_reliability_distributed.py).
            load_dir = cleanup = ckpt.parent / "universal.partial"
            if self.rank == 0:
                log.warning("checkpoint %s was written by %d ranks; this run has %d: converting it to DeepSpeed's "
                            "universal format to re-partition the optimizer state", ckpt, saved_world, self.world)
                shutil.rmtree(cleanup, ignore_errors=True)
                to_universal(ckpt, cleanup)
            self._barrier()
            before = meta.get("prompts_per_rank", self.config.train.prompts_per_step) * saved_world
            now = self.config.train.prompts_per_step * self.world
            if before != now and self.rank == 0:
                log.warning("global batch changes from %d to %d prompts per micro-batch (train.prompts_per_step x "
                            "ranks): the run continues, but not the curve it would have had", before, now)
        load_path, client = self.engine.load_checkpoint(str(load_dir), tag=ckpt.name, load_module_strict=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
        if cleanup is not None:
            self._barrier()
            if self.rank == 0:
                shutil.rmtree(cleanup, ignore_errors=True)
        self.start_step = int(meta["step"])
        self.nonfinite_streak = int((client or {}).get("nonfinite_streak", 0))
        if self.rank == 0:
            log.info("resumed from %s at step %d", ckpt, self.start_step)

    # ------------------------------------------------------------------------------------------- loop

    def _cond(self, texts: list[str]):
        return self.embeddings.cond(texts).to(self.device)

    def train_step(self, step: int) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        pool, pool_key = self.router.pool(step)
        sums: dict[str, torch.Tensor] = {}
        per_field: dict[str, list[torch.Tensor]] = {}
        # per chunk: (field of every target row, finite per target row, finite per student row), on the device:
        # inspected only when the step turns out non-finite, so a healthy step adds no host sync
        checks: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        data_crc = 0
        skipped_before = self.engine.skipped_steps
        latent = (self.preset.latent_channels, self.preset.latent_size, self.preset.latent_size)
        student_roll = student_field(c.rollout.cfg_scale)
        student_loss = student_field(c.opd.student_cfg)
        for micro in range(c.train.grad_accum):
            batch = self.sampler.batch(step, micro, pool, pool_key)
            data_crc = zlib.crc32(json.dumps(batch.sample_ids).encode(), data_crc)
            routes = self.router.route(step, batch.tasks)
            cond = self._cond(batch.texts)
            with self.timer.range("rollout", "green"):
                if self.runner is not None:  # in-kernel Philox step noise, still keyed by (seed, sample id, step)
                    traj = self.runner.rollout(cond, PhiloxNoise(c.train.seed, batch.sample_ids, latent, self.device),
                                               self.sigmas)
                else:
                    noise = SampleNoise(c.train.seed, batch.sample_ids, latent, self.device)
                    velocity = functools.partial(self.evaluator.field_velocity, student_roll, cond=cond)
                    traj = rollout(velocity, noise, self.sigmas, c.rollout.sampler, c.rollout.noise_level)
            queries = select_queries(c.rollout.steps, batch.sample_ids, c.opd.query_states, c.opd.query_bias,
                                     c.train.seed).to(self.device)
            arange = torch.arange(len(batch), device=self.device)
            for j in range(self.chunks):
                idx = queries[:, j]
                tr = Transition(
                    x=traj.states[idx, arange], x_next=traj.states[idx + 1, arange],
                    sigma=self.sigmas[idx], sigma_next=self.sigmas[idx + 1], sigma_1=self.sigma_1,
                    noise_level=c.rollout.noise_level, logp_old=traj.log_probs[idx, arange],
                )
                with self.timer.range("fields", "orange"), torch.no_grad():
                    use_anchor = bool(c.opd.anchor) and c.opd.beta > 0
                    rows = routes + ([c.opd.anchor] * len(batch) if use_anchor else [])
                    reps = 2 if use_anchor else 1
                    v_all = self.evaluator.velocities(tr.x.repeat(reps, 1, 1, 1), tr.sigma.repeat(reps),
                                                      cond[torch.arange(len(batch)).repeat(reps)], rows)
                    v_target = v_all[: len(batch)]
                    v_anchor = v_all[len(batch):] if use_anchor else None
                with self.timer.range("student", "red"):
                    with self.timer.range("student/forward", "red"):
                        v_student = self.evaluator.field_velocity(student_loss, tr.x, tr.sigma, cond)
                        out = opd_loss(c.opd, v_student, v_target, tr, v_anchor)
                    checks.append((rows, torch.isfinite(v_all.flatten(1)).all(1),
                                   torch.isfinite(v_student.detach().flatten(1)).all(1)))
                    with self.timer.range("student/backward", "red"):
                        self.engine.backward(out.loss)
                with self.timer.range("optimizer", "purple"):
                    self.engine.step()
                for k, v in out.terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                for name in set(routes):
                    mask = torch.tensor([r == name for r in routes], device=self.device)
                    per_field.setdefault(name, []).append(out.per_sample[mask].mean())
        n = c.train.grad_accum * self.chunks
        sums = self._global_mean(sums)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        elapsed = time.perf_counter() - t0
        images = self.rows * c.train.grad_accum * self.world
        row: dict[str, Any] = {
            "step": step,
            **{k: float(v) / n for k, v in sums.items()},
            **{f"field/{k}": float(torch.stack(v).mean()) for k, v in per_field.items()},
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": grad_norm,
            "images_per_s": images / elapsed,
            "step_s": elapsed,
            **{f"time/{k}": v for k, v in self.timer.pop().items()},
            "data_crc": data_crc,
        }
        # loss terms and grad norm are global (all-reduced), so every rank takes the same branch here
        finite = math.isfinite(grad_norm) and all(math.isfinite(float(v)) for v in sums.values())
        row["skipped"] = self.engine.skipped_steps != skipped_before
        if finite and row["skipped"]:
            log.warning("step %d: DeepSpeed skipped the update (loss-scale overflow)", step)
        if not finite:
            culprits = self._nonfinite_culprits(checks)
            row["nonfinite_fields"] = culprits
            if not row["skipped"]:  # cannot happen with compute_grad_norm on; never continue from a corrupt student
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
        else:
            self.nonfinite_streak = 0
        return row

    def _field_label(self, name: str) -> str:
        """`field (teacher adapter)` for logs; the base model for fields with adapters disabled."""
        f = self.fields.get(name)
        source = "base model" if f is None or f.adapter is None else f"teacher {f.adapter}"
        return f"{name} ({source})"

    def _nonfinite_culprits(self, checks: list[tuple[list[str], torch.Tensor, torch.Tensor]]) -> list[str]:
        """Which fields (and teachers) produced non-finite targets this step, on any rank; else `student` (its
        own velocity), else `loss` / `gradient` (finite inputs, non-finite result)."""
        import torch.distributed as dist

        bad: set[str] = set()
        for rows, target_ok, student_ok in checks:
            bad.update(self._field_label(r) for r, ok in zip(rows, target_ok.tolist()) if not ok)
            if not bool(student_ok.all()):
                bad.add("student")
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, sorted(bad))
            bad = {name for part in gathered for name in part}
        return sorted(bad) or ["loss/gradient (all field and student velocities were finite)"]

    def _global_mean(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms averaged over ranks (one small all-reduce per step), so logs match any world size."""
        import torch.distributed as dist

        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        dist.all_reduce(packed)
        return dict(zip(keys, packed / self.world))

    def _all_ranks(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (an all-reduce; also the barrier between checkpoint phases)."""
        import torch.distributed as dist

        if self.world == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def save_checkpoint(self, next_step: int, final: bool = False) -> bool:
        """Write checkpoint `step_<next_step>`; True when it is complete on disk.

        A write that fails on any rank (disk full, I/O error) leaves the previous checkpoint as the newest
        complete one; the partial dir is removed, the failure logged, and training goes on (the next save
        retries). After MAX_SAVE_FAILURES failures in a row, or when the final save fails, CheckpointError stops
        the run: re-running the same command then resumes from the kept checkpoint."""
        root = self.out / "checkpoints"
        tag = tag_for(next_step)
        meta = {"step": next_step, "resume_digest": _resume_digest(self.config), "world_size": self.world,
                "prompts_per_rank": self.config.train.prompts_per_step}
        fault = self.faults
        error: BaseException | None = None
        with self.timer.range("checkpoint", "gray"):
            writer = self.engine.checkpoint_engine
            if fault is not None:
                writer.save = fault.wrap_writer(next_step, type(writer).save.__get__(writer))
            try:
                self.engine.save_checkpoint(str(root), tag=f"{tag}.partial", save_latest=False,
                                            exclude_frozen_parameters=True,
                                            client_state={"step": next_step, "nonfinite_streak": self.nonfinite_streak})
            except (OSError, RuntimeError) as exc:  # torch.save into a full disk raises RuntimeError ("unexpected pos")
                if is_collective_error(exc):
                    raise
                # every file write sits between DeepSpeed's opening collectives and its closing barrier, so the
                # failed rank stands in for that barrier and the ranks stay in step
                error = exc
                self._barrier()
            finally:
                if fault is not None:
                    del writer.save
            try:
                if fault is not None and error is None:
                    fault.hit("ckpt.saved", next_step)
            except OSError as exc:
                error = exc
            if error is None and self.metrics is not None and not self.metrics.flush():
                # a checkpoint never gets ahead of metrics.jsonl: a resume from it would lose those lines
                error = OSError(f"lines of {self.metrics.path} are not on disk yet")
            ok = self._all_ranks(error is None)
            if ok and self.rank == 0:
                try:
                    hook = None if fault is None else functools.partial(fault.hit, step=next_step)
                    finalize(root, tag, meta, self.config.train.keep_checkpoints, hook)
                except (OSError, CheckpointError) as exc:
                    error = exc
            ok = self._all_ranks(ok and error is None)
        if ok:
            self.save_failures = 0
            return True
        self.save_failures += 1
        kept = "none yet"
        if self.rank == 0:
            discard_partial(root, tag)
            newest = complete_checkpoints(root)
            kept = str(newest[0]) if newest else "none yet"
        cause = f"disk full or I/O error? {type(error).__name__}: {error}" if error else "failed on another rank"
        what = f"checkpoint {tag} could not be written ({cause}); newest complete checkpoint: {kept}"
        if final or self.save_failures >= MAX_SAVE_FAILURES:
            raise CheckpointError(f"{what}. {self.save_failures} failed save(s) in a row; stopping. Free space or "
                                  f"fix {root}, then re-run the same command to resume from the kept checkpoint")
        log.error("%s; training continues and retries at the next checkpoint (%d/%d failures in a row)", what,
                  self.save_failures, MAX_SAVE_FAILURES)
        return False

    def export(self) -> Path | None:
        if self.rank != 0:
            return None
        return export_adapter(self.model, self.out / "export", STUDENT)

    def train(self, callbacks: Sequence[StepCallback] = ()) -> list[dict[str, Any]]:
        """Run the remaining steps. Each callback is called as `cb(trainer, n)` with the number of finished steps:
        once before the first step of a fresh run (n = 0) and after every step, before that step's checkpoint."""
        from tqdm import tqdm

        c = self.config.train
        rows = []
        bar = tqdm(range(self.start_step, c.steps), initial=self.start_step, total=c.steps, desc="opd",
                   disable=self.rank != 0, dynamic_ncols=True)
        fault = self.faults
        if self.start_step == 0:
            for cb in callbacks:
                cb(self, 0)
        for step in bar:
            if fault is not None:
                fault.hit("step.begin", step)
            self.profiler.before_step(step)
            row = self.train_step(step)
            self.profiler.after_step(step)
            rows.append(row)
            if fault is not None:
                fault.hit("step.end", step)
            if self.metrics is not None and (step % c.log_every == 0 or step + 1 == c.steps):
                self.metrics.write(row)
            if fault is not None:
                fault.hit("step.logged", step)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_s=f"{row['images_per_s']:.1f}")
            for cb in callbacks:
                cb(self, step + 1)
            if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == c.steps:
                self.save_checkpoint(step + 1, final=step + 1 == c.steps)
        self.export()
        self._barrier()
        return rows

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
