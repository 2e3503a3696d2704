"""The student model of a run, built from its config alone: base (loaded or a preset), the student LoRA, the
teachers, the cold start, the attention implementation, regional compilation. Pure: no trainer state, no DeepSpeed,
nothing written (except `export_student`, which writes the export).

- Cold start (`[init]`): the merge of teachers or an init adapter goes into the student LoRA (Flow-OPD), or, with
  `init.warm_start`, into the student's base (DanceOPD: danceopd/backends/sd35_diffusers.py:59-71 merges the init
  PEFT LoRA into the student transformer with `merge_and_unload`, then :74-86 adds a fresh LoRA, gaussian A and
  B = 0; its teachers are separate models on the clean base, :96-119). All fields here share one base, so the
  warm start is a frozen companion adapter (`WARM`) that `AdapterSwitch` activates together with the student and
  with nothing else: the student computes base + init + its LoRA, every other field the clean base + its own.
  The export folds both into one adapter of rank r_student + r_init (`fold_adapters`), so loading it on the clean
  base reproduces the student.
- Full-checkpoint teachers (`[[teachers]] path` = a transformer dir, DanceOPD's realism teacher, :97-113): a second
  frozen model loaded through the family's `ModelBackend.load`, cast to the run's device and dtype, evaluated in its
  own forward (engine/fields/evaluator.py `models`). Memory: its parameters once more (SD3.5-M: 2.24 G parameters,
  4.5 GB in bf16, counted on the meta device) plus its activations during its no-grad forward; its rows never
  share the batched forward.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from engine import rng
from engine.adapters.export import export_adapter
from engine.adapters.lora import (
    STUDENT,
    LoraSpec,
    adapter_scale,
    add_adapter,
    is_full_checkpoint,
    load_adapter,
    load_teachers,
    lora_layers,
    set_companions,
)
from engine.adapters.merge import merge_into_student
from engine.backends.base import ModelBackend, ModelSpec
from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.errors import ConfigError

log = logging.getLogger("flowopd")

WARM = "_warm_start"
"""The frozen companion adapter holding the warm start (init.warm_start)."""
EXPORT = "_export"


def build_student(config: Config, backend: ModelBackend) -> tuple[torch.nn.Module, ModelSpec]:
    """The base model in float32 with every adapter of the run on it (the student initialised as configured)."""
    c = config
    if c.model.path:
        model, spec = backend.load(resolve_path(c.model.path), torch.float32, c.model.latent_size)
    else:
        model, spec = backend.build(c.model.preset, c.model.init_seed, torch.float32, c.model.latent_size)
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
    _cold_start(c, model)
    backend.install_attention(model, c.model.attention, c.model.attention_backend)
    if c.model.compile == "blocks":
        compile_blocks(model)
    drop_buffers_from_state(model)
    return model, spec


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """`model.compile = "blocks"`: torch.compile every block of the model's top-level ModuleLists in place (SD3:
    `transformer_blocks`); returns how many. Regional compilation: dynamo inlines the blocks' modules, so blocks of
    one structure share a graph (SD3.5-M: the dual-attention, plain and context-pre-only blocks, 3 graphs for 24
    blocks), compiled at the first forward of each shape; module objects, names and state_dict stay as they are.
    peft's active adapter is guarded on, so every adapter switch of the reference evaluator is another compile."""
    n = 0
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                block.compile(backend=backend)
                n += 1
    return n


def _cold_start(c: Config, model: torch.nn.Module) -> None:
    """`[init]`: the merge or the init adapter into the student LoRA, or (warm start) into the WARM companion."""
    s = c.student
    target = WARM if c.init.warm_start else STUDENT
    if c.init.merge != "none":
        names = c.init.teachers or [t.name for t in c.teachers]
        full = [t.name for t in c.teachers if t.name in names and t.random_seed < 0
                and is_full_checkpoint(resolve_path(t.path))]
        if full:
            raise ConfigError([f"init.merge merges LoRA teachers; {full} are full checkpoints: list the LoRA "
                               f"teachers in init.teachers"])
        ranks = {model.peft_config[n].r for n in names}
        off = [f"{n} (rank {model.peft_config[n].r})" for n in names if model.peft_config[n].r != s.rank]
        if c.init.merge == "average" and off and not c.init.warm_start:
            raise ConfigError([f"init.merge = 'average' averages A and B, so every merged teacher needs "
                               f"student.rank = {s.rank}: {', '.join(off)}; use init.merge = 'svd'"])
        if c.init.warm_start:  # exact: rank sum(r_i) holds the svd merge, the teachers' rank the average
            if c.init.merge == "average" and len(ranks) > 1:
                raise ConfigError([f"init.merge = 'average' needs teachers of one rank; ranks {sorted(ranks)}"])
            rank = max(ranks) if c.init.merge == "average" else sum(model.peft_config[n].r for n in names)
            add_adapter(model, WARM, LoraSpec(rank, float(rank), tuple(s.targets), "zeros"))
        uncovered = merge_into_student(model, names, c.init.merge, c.init.weights or None, student=target)
    elif c.init.adapter:
        if c.init.warm_start:
            load_adapter(model, WARM, resolve_path(c.init.adapter))
            uncovered = 0
        else:
            load_adapter(model, "_init", resolve_path(c.init.adapter))
            uncovered = merge_into_student(model, ["_init"], "svd", [1.0])
            model.delete_adapters("_init")
    else:
        return
    if uncovered:
        log.info("cold start: %d student layer(s) targeted by no merged adapter keep their init (A drawn, B = 0)",
                 uncovered)
    if c.init.warm_start:
        model.requires_grad_(False)
        set_companions(model, STUDENT, [WARM])
        log.info("warm start: %s is merged under the student (frozen); the student LoRA starts at B = 0", WARM)


def load_full_teachers(config: Config, backend: ModelBackend, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """teacher name -> its frozen model, for each `[[teachers]]` entry whose path is a full transformer dir."""
    out: dict[str, torch.nn.Module] = {}
    for t in config.teachers:
        if t.random_seed >= 0 or not is_full_checkpoint(resolve_path(t.path)):
            continue
        model, _ = backend.load(resolve_path(t.path), torch.float32, config.model.latent_size)
        backend.install_attention(model, config.model.attention, config.model.attention_backend)
        out[t.name] = model.to(device, dtype).eval().requires_grad_(False)
        log.info("teacher %s: full checkpoint %s, a second frozen model (%.1f M parameters)", t.name, t.path,
                 sum(p.numel() for p in model.parameters()) / 1e6)
    return out


@torch.no_grad()
def fold_adapters(model: torch.nn.Module, names: list[str], out: str) -> str:
    """A new adapter `out` whose delta is the sum of the adapters `names` (exact: rank = the sum of their ranks,
    A stacked, B stacked and scaled by each adapter's alpha / r, alpha = rank); returns `out`."""
    ranks = [model.peft_config[n].r for n in names]
    targets = sorted({m for n in names for m in model.peft_config[n].target_modules})
    total = sum(ranks)
    add_adapter(model, out, LoraSpec(total, float(total), tuple(targets), "zeros"))
    scales = [adapter_scale(model, n) for n in names]
    for layer in lora_layers(model):
        if out not in layer.lora_A:
            continue
        a, b = layer.lora_A[out].weight, layer.lora_B[out].weight
        a.zero_()
        b.zero_()
        at = 0
        for n, r, sc in zip(names, ranks, scales):
            if n in layer.lora_A:
                a[at:at + r] = layer.lora_A[n].weight.to(a.dtype)
                b[:, at:at + r] = (sc * layer.lora_B[n].weight.double()).to(b.dtype)
            at += r
    return out


def export_student(model: torch.nn.Module, out_dir: Path, backend: ModelBackend) -> Path:
    """Export the student (PEFT dir + the family's diffusers file); a warm-started student as one adapter holding
    the warm start and the student LoRA (loading it on the clean base gives the trained student)."""
    if WARM not in getattr(model, "peft_config", {}):
        return export_adapter(model, out_dir, backend, STUDENT)
    # adding an adapter re-activates and re-flags layers (diffusers' add_adapter calls set_adapter): restore both
    trainable = {p: p.requires_grad for p in model.parameters()}
    active = [(layer, layer._active_adapter, layer._disable_adapters) for layer in lora_layers(model)]
    try:
        fold_adapters(model, [WARM, STUDENT], EXPORT)
        return export_adapter(model, out_dir, backend, EXPORT)
    finally:
        if EXPORT in model.peft_config:
            with warnings.catch_warnings():  # peft: "Adapter _export was active which is now deleted" (restored below)
                warnings.simplefilter("ignore", UserWarning)
                model.delete_adapters(EXPORT)
        for p, g in trainable.items():
            p.requires_grad_(g)
        for layer, names, disabled in active:
            layer._active_adapter, layer._disable_adapters = names, disabled
def drop_buffers_from_state(model: torch.nn.Module) -> int:
    """Mark every buffer of the training model non-persistent, so no checkpoint writes one; returns their bytes.

    A buffer is frozen state that the model rebuilds (SD3's sin-cos `pos_embed`) or that the base weights hold, never
    something training changes; DeepSpeed's `exclude_frozen_parameters` drops only parameters. Measured on SD3.5-M:
    `pos_embed.pos_embed` (384^2 positions x 1536, float32) is 906 MB, 75% of a 1.24 GB Flow-OPD checkpoint."""
    total = 0
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                module._non_persistent_buffers_set.add(name)
                total += buf.numel() * buf.element_size()
    return total
