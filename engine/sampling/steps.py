"""Denoising steps of the rollout (DESIGN §1), reference implementations + the dispatch point.

The triton/cuda backends (kernels/sde_step.py, kernels/ode_step.py, csrc/) register in kernel_backends.py;
`sde_step_indexed` / `ode_step_indexed` below are the graph-capturable forms (sigmas indexed on the device).

Conventions: sigma runs 1 -> 0, `x_sigma = (1 - sigma) x_data + sigma eps`, velocity `v ~ eps - x_data`.
`sigma`/`sigma_next` may be Python floats, 0-d tensors, or per-sample tensors of shape [B] (query states
of one batch sit at different steps). Math runs in float32 (float64 in tests); `sample`/`mean` come back in
the dtype of `x`, `log_prob` as float32 [B].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from engine import dispatch

log = logging.getLogger(__name__)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStepOutput:
    sample: torch.Tensor
    """x' = mu + s sqrt(-dt) eps, dtype of x."""
    mean: torch.Tensor
    """mu, the transition mean, dtype of x (None from sde_step_indexed(return_mean=False))."""
    log_prob: torch.Tensor
    """log p(x'|x), mean over the non-batch dims, float32 [B]."""
    std: torch.Tensor
    """s = a sqrt(sigma / (1 - sigma~)) per sample, float32 [B] (the KL denominator is 2 s^2)."""


def _per_sample(value: float | torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` as a [B, 1, 1, ...] tensor broadcastable against x."""
    t = torch.as_tensor(value, dtype=dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def sde_noise_std(
    sigma: torch.Tensor, sigma_1: float | torch.Tensor, noise_level: float
) -> torch.Tensor:
    """s = a sqrt(sigma / (1 - sigma~)) with sigma~ = sigma except sigma~ = sigma_1 where sigma == 1.

    `sigma_1` is the schedule's second sigma (0.960 for 10 steps at shift 3): at sigma = 1 the ratio would
    divide by zero, so Flow-GRPO changes only the denominator there; the numerator stays sigma.
    """
    sigma_1 = torch.as_tensor(sigma_1, dtype=sigma.dtype, device=sigma.device)
    denom = 1 - torch.where(sigma == 1, sigma_1, sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step_ref(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sigma_1: float | torch.Tensor,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> SDEStepOutput:
    """Flow-GRPO's SDE step with its log-prob, as an unfused chain of PyTorch ops (the reference).

    mu  = x + (v + s^2/(2 sigma) (x + (1 - sigma) v)) dt,   dt = sigma_next - sigma < 0
    x'  = mu + s sqrt(-dt) eps          (or x' = prev_sample when re-scoring a stored transition)
    log p(x'|x) = mean_CHW[ -(x' - mu)^2 / (2 s^2 (-dt)) - log(s sqrt(-dt)) - log(2 pi)/2 ]
    Gradients flow through v (and x) into mu and log_prob; x' itself is detached when given.
    """
    xf, vf = x.to(compute_dtype), v.to(compute_dtype)
    sig = _per_sample(sigma, x, compute_dtype)
    sig_next = _per_sample(sigma_next, x, compute_dtype)
    dt = sig_next - sig
    s = sde_noise_std(sig, torch.as_tensor(sigma_1, dtype=compute_dtype), noise_level)
    mean = xf + (vf + s * s / (2 * sig) * (xf + (1 - sig) * vf)) * dt
    std_dev = s * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        sample = mean + std_dev * noise.to(compute_dtype)
    else:
        sample = prev_sample.detach().to(compute_dtype)
    lp = -((sample.detach() - mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev) - _HALF_LOG_2PI
    log_prob = lp.mean(dim=tuple(range(1, x.ndim))).to(torch.float32)
    return SDEStepOutput(
        sample=sample.to(x.dtype),
        mean=mean.to(x.dtype),
        log_prob=log_prob,
        std=s.reshape(-1).to(torch.float32),
    )


def ode_step_ref(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """Deterministic Euler step x' = x + (sigma_next - sigma) v (fp32 math, dtype of x out)."""
    dt = _per_sample(sigma_next, x, torch.float32) - _per_sample(sigma, x, torch.float32)
    return (x.float() + dt * v.float()).to(x.dtype)


def cfg_combine_ref(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + g (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


dispatch.register("sde_step", "torch", sde_step_ref)
dispatch.register("ode_step", "torch", ode_step_ref)
dispatch.register("cfg_combine", "torch", cfg_combine_ref)


def sde_step(*args, **kwargs) -> SDEStepOutput:
    """SDE step through the dispatch point (same signature as `sde_step_ref`)."""
    return dispatch.resolve("sde_step")(*args, **kwargs)


def ode_step(*args, **kwargs) -> torch.Tensor:
    """Euler ODE step through the dispatch point (same signature as `ode_step_ref`)."""
    return dispatch.resolve("ode_step")(*args, **kwargs)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG combination through the dispatch point."""
    return dispatch.resolve("cfg_combine")(v_uncond, v_cond, scale)


def sde_step_indexed(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
    return_mean: bool = True,
    out: torch.Tensor | None = None,
) -> SDEStepOutput:
    """The SDE step with sigmas read on the device: no host sync, capturable in a CUDA graph (triton/cuda).

    sigma = sigmas[step], sigma_next = sigmas[step + 1], sigma_1 = sigmas[1] (the schedule's second sigma).
    - x [B, ...] float32/bf16/fp16; v of x's shape, or v=None with v_uncond, v_cond and `guidance` (CFG fused:
      v = v_u + g (v_c - v_u)); sigmas float32 [S+1] on x's device (flow_match_sigmas(...).to(device));
      step int32/int64 on x's device, 1 element (all rows at the same step) or [B] (per-row steps).
    - x' = prev_sample when given (re-scoring a stored transition), else mu + std * noise when `noise` is given,
      else mu + std * z with z the Philox stream of kernels/philox.py keyed by `seed` (int, or int64 tensor of 1
      element or [B] = one seed per row) and `offset` (int or 1-element int64 tensor, e.g. the step number).
      Device-tensor seeds let a replayed graph draw new noise after `seed.copy_(...)`.
    - return_mean=False skips writing mu (mean is then None); out (no-grad only) receives x' and may be x.
    Returns SDEStepOutput(sample, mean, log_prob float32 [B], std = s float32 [B]); gradients reach x, v, v_u, v_c.
    """
    r = dispatch.resolve("sde_step_indexed")(
        x, v, sigmas, step, noise_level, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, noise=noise,
        prev_sample=prev_sample, seed=seed, offset=offset, return_mean=return_mean, out=out)
    return SDEStepOutput(sample=r.sample, mean=r.mean, log_prob=r.log_prob, std=r.std)


def ode_step_indexed(
    x: torch.Tensor,
    v: torch.Tensor | None,
    sigmas: torch.Tensor,
    step: torch.Tensor,
    *,
    v_uncond: torch.Tensor | None = None,
    v_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler step x + (sigmas[step + 1] - sigmas[step]) v, graph-capturable; arguments as in sde_step_indexed."""
    return dispatch.resolve("ode_step_indexed")(
        x, v, sigmas, step, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, out=out)


def _register_kernel_backends() -> None:
    """The triton/cuda backends; their module imports no kernel code, so this cannot fail on a CPU machine."""
    try:
        from engine.sampling import kernel_backends
    except ImportError as e:  # pragma: no cover - only a broken checkout gets here
        log.warning("flowopd: kernel backends not registered (%s); the torch reference is used", e)
        return
    kernel_backends.register_all()


_register_kernel_backends()
