"""The student model of a run, built from its config alone: base (loaded or a preset), the student LoRA, the
teachers, the cold start, the attention implementation, regional compilation. Pure: no trainer state, no DeepSpeed,
nothing written."""

from __future__ import annotations

import torch

from engine import rng
from engine.adapters.lora import STUDENT, LoraSpec, add_adapter, load_adapter, load_teachers
from engine.adapters.merge import merge_into_student
from engine.backends.base import ModelBackend, ModelSpec
from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.errors import ConfigError


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
