"""The DeepSpeed JSON of a run: the user's file (ZeRO stage, comm) with batch sizes, clipping and precision set
from the config, so DeepSpeed owns loss scaling, gradient reduction, clipping and the optimizer step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def read_deepspeed_json(path: Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON; FileNotFoundError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: DeepSpeed config not found: {path}")
    return json.loads(path.read_text())


def deepspeed_config(base: dict[str, Any], *, rows: int, micro_steps: int, world: int, grad_clip: float,
                     dtype: torch.dtype, universal: bool) -> dict[str, Any]:
    """`base` with the run's settings: `rows` images per micro-step, `micro_steps` micro-steps per optimizer step
    (grad_accum x query chunks), `world` ranks; `universal` loads a checkpoint written at another world size."""
    ds = json.loads(json.dumps(base))
    ds["train_micro_batch_size_per_gpu"] = rows
    ds["gradient_accumulation_steps"] = micro_steps
    ds["train_batch_size"] = rows * micro_steps * world
    ds["gradient_clipping"] = grad_clip
    # a non-finite gradient norm is what makes ZeRO skip a step in fp32 (bf16/fp16 check overflow as well)
    ds.setdefault("zero_optimization", {})["compute_grad_norm"] = True
    if universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds
