"""The op table of kernel backends (docs/kernels.md, "The op table"): typed entry points, one availability rule.

    from engine import ops
    ops.configure(default="auto", backends={"sde_step": "torch"})   # the [kernels] config; env overrides it
    out = ops.sde_step(x, v, sigma, sigma_next, sigma_1, 0.7, noise=eps)

This package sits just above kernels/: it imports nothing else from the engine, and no kernel module (nor
triton, nor CUDA) at import time; every kernel is imported on its first call.
"""

from __future__ import annotations

from engine.ops.attention import qk_rmsnorm, qk_rmsnorm_torch
from engine.ops.lora import lora_segmented, lora_segmented_torch
from engine.ops.registry import (
    BACKENDS,
    Impl,
    Op,
    available,
    available_backends,
    chosen,
    configure,
    env_request,
    ops,
    problems,
    register,
    requested,
    resolve,
)
from engine.ops.sampling import (
    SDEStepOutput,
    cfg_combine,
    cfg_combine_ref,
    ode_step,
    ode_step_indexed,
    ode_step_indexed_torch,
    ode_step_ref,
    sde_noise_std,
    sde_step,
    sde_step_indexed,
    sde_step_indexed_torch,
    sde_step_ref,
)

__all__ = [
    "BACKENDS", "Impl", "Op", "SDEStepOutput", "available", "available_backends", "cfg_combine", "cfg_combine_ref",
    "chosen", "configure", "env_request", "lora_segmented", "lora_segmented_torch", "ode_step", "ode_step_indexed",
    "ode_step_indexed_torch", "ode_step_ref", "ops", "problems", "qk_rmsnorm", "qk_rmsnorm_torch", "register",
    "requested", "resolve", "sde_noise_std", "sde_step", "sde_step_indexed", "sde_step_indexed_torch", "sde_step_ref",
]
