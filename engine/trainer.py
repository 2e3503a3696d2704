"""The OPD loop: rollout -> query states -> field targets -> student loss -> DeepSpeed step -> log/checkpoint.

One optimizer step = `train.grad_accum` rollout micro-batches; each micro-batch's query states are scored
in q chunks (one query slot of every sample per chunk), and each chunk is one DeepSpeed micro-step
(gradient_accumulation_steps = grad_accum * q), so DeepSpeed owns loss scaling, gradient reduction,
clipping and the optimizer step, and the loss of a step is the mean over all its query states.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine import dispatch, rng
from engine.checkpoint import finalize, find_resumable, tag_for
from engine.config import Config, to_toml
from engine.data.cache import load_or_build
from engine.data.encoders import build_encoder
from engine.data.prompts import load_prompts
from engine.data.sampler import PromptSampler
from engine.metrics import MetricsWriter
from engine.models.export import export_adapter
from engine.models.loading import build_preset, load_transformer, preset_from_model
from engine.models.lora import STUDENT, LoraSpec, add_adapter, freeze_for_training, load_adapter, random_adapter
from engine.models.merge import merge_into_student
from engine.models.presets import get_preset
from engine.opd.fields import Field, FieldEvaluator, student_field
from engine.opd.losses import Transition, opd_loss
from engine.opd.query import select_queries
from engine.opd.routing import Router
from engine.profiling import CudaProfilerWindow, PhaseTimer
from engine.sampling.rollout import SampleNoise, rollout
from engine.sampling.schedule import flow_match_sigmas

log = logging.getLogger("flowopd")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config keys whose change makes a checkpoint unusable for resuming (the student's shape and its base).
RESUME_KEYS = ("model", "student")


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); a plain `python engine/train.py` becomes a 1-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    deepspeed.init_distributed(verbose=False)
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
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(c))

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
                                     c.train.grad_accum, self.world, self.rank)

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
        self.model = self.engine.module
        self.model.eval()  # SD3 has no dropout; eval() keeps peft's lora_dropout (0) and norms inert
        self.uncond = self.embeddings.uncond.to(self.device)
        self.fields = {f.name: Field(f.name, None if f.source == "base" else f.source, f.cfg_scale) for f in c.fields}
        self.evaluator = self._build_evaluator()

        # ---- resume
        self.start_step = 0
        self._resume()
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", self.start_step) if self.rank == 0 else None
        self.profiler = CudaProfilerWindow(c.train.profile_steps)
        self.nonfinite_streak = 0

    # ------------------------------------------------------------------------------------------ setup

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def _build_model(self) -> tuple[torch.nn.Module, Any]:
        c = self.config
        if c.model.path:
            model = load_transformer(c.model.path, torch.float32)
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
            add_adapter(model, STUDENT, LoraSpec(s.rank, s.alpha, tuple(s.targets), s.init))
        for t in c.teachers:
            if t.random_seed >= 0:
                random_adapter(model, t.name, LoraSpec(t.rank, float(t.rank), tuple(s.targets)), t.random_seed)
            else:
                load_adapter(model, t.name, t.path, alpha=t.alpha or None)
        if c.init.merge != "none":
            names = c.init.teachers or [t.name for t in c.teachers]
            merge_into_student(model, names, c.init.merge, c.init.weights or None)
        elif c.init.adapter:
            load_adapter(model, "_init", c.init.adapter)
            merge_into_student(model, ["_init"], "svd", [1.0])
            model.delete_adapters("_init")
        if c.model.attention == "fused":
            from engine.models.attention import install_fused_attention

            install_fused_attention(model, backend=c.model.attention_backend)
        return model, preset

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
        ds.pop("bf16", None)
        ds.pop("fp16", None)
        if self.dtype == torch.bfloat16:
            ds["bf16"] = {"enabled": True}
        elif self.dtype == torch.float16:
            ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
        return ds

    def _resume(self) -> None:
        found = find_resumable(self.out / "checkpoints")
        if found is None:
            return
        ckpt, meta = found
        if meta.get("resume_digest") != _resume_digest(self.config):
            raise RuntimeError(
                f"checkpoint {ckpt} was written with a different model/student config; resume it with the same "
                f"[model] and [student] settings (see {self.out / 'config.toml'}) or use a new --output-dir"
            )
        load_path, _ = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
        self.start_step = int(meta["step"])
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
        nonfinite_fields: set[str] = set()
        latent = (self.preset.latent_channels, self.preset.latent_size, self.preset.latent_size)
        student_roll = student_field(c.rollout.cfg_scale)
        student_loss = student_field(c.opd.student_cfg)
        for micro in range(c.train.grad_accum):
            batch = self.sampler.batch(step, micro, pool, pool_key)
            routes = self.router.route(step, batch.tasks)
            cond = self._cond(batch.texts)
            with self.timer.range("rollout", "green"):
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
                    v_student = self.evaluator.field_velocity(student_loss, tr.x, tr.sigma, cond)
                    out = opd_loss(c.opd, v_student, v_target, tr, v_anchor)
                    if not torch.isfinite(out.loss):
                        ok = torch.isfinite(v_target.flatten(1)).all(1).tolist()
                        bad = [r for r, fine in zip(routes, ok) if not fine]
                        nonfinite_fields.update(bad or ["student"])
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
        }
        finite = math.isfinite(grad_norm) and math.isfinite(row.get("loss", 0.0)) and not nonfinite_fields
        row["skipped"] = not finite
        if not finite:
            self.nonfinite_streak += 1
            row["nonfinite_fields"] = sorted(nonfinite_fields)
            log.warning("step %d: non-finite loss/gradient (fields: %s); DeepSpeed skipped the update",
                        step, sorted(nonfinite_fields) or "?")
            if self.nonfinite_streak >= c.train.max_nonfinite:
                raise FloatingPointError(
                    f"{self.nonfinite_streak} consecutive steps with non-finite loss or gradients (last at step "
                    f"{step}, fields {sorted(nonfinite_fields)}); stopping. Lower train.lr or check the teachers."
                )
        else:
            self.nonfinite_streak = 0
        return row

    def _global_mean(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms averaged over ranks (one small all-reduce per step), so logs match any world size."""
        import torch.distributed as dist

        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        dist.all_reduce(packed)
        return dict(zip(keys, packed / self.world))

    def save_checkpoint(self, next_step: int) -> None:
        root = self.out / "checkpoints"
        tag = tag_for(next_step)
        meta = {"step": next_step, "resume_digest": _resume_digest(self.config), "world_size": self.world}
        with self.timer.range("checkpoint", "gray"):
            self.engine.save_checkpoint(str(root), tag=f"{tag}.partial", client_state={"step": next_step},
                                        save_latest=False, exclude_frozen_parameters=True)
            self._barrier()
            if self.rank == 0:
                finalize(root, tag, meta, self.config.train.keep_checkpoints)
            self._barrier()

    def export(self) -> Path | None:
        if self.rank != 0:
            return None
        return export_adapter(self.model, self.out / "export", STUDENT)

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        c = self.config.train
        rows = []
        bar = tqdm(range(self.start_step, c.steps), initial=self.start_step, total=c.steps, desc="opd",
                   disable=self.rank != 0, dynamic_ncols=True)
        for step in bar:
            self.profiler.before_step(step)
            row = self.train_step(step)
            self.profiler.after_step(step)
            rows.append(row)
            if self.metrics is not None and (step % c.log_every == 0 or step + 1 == c.steps):
                self.metrics.write(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_s=f"{row['images_per_s']:.1f}")
            if (c.save_every and (step + 1) % c.save_every == 0) or step + 1 == c.steps:
                self.save_checkpoint(step + 1)
        self.export()
        self._barrier()
        return rows

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
