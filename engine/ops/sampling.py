"""The denoising-step ops (DESIGN §1): references, their kernel backends and the typed entry points.

Ops `sde_step`, `ode_step`, `cfg_combine` (the reference's arguments) and `sde_step_indexed`, `ode_step_indexed`
(the graph-capturable forms: sigmas indexed on the device). The triton/cuda kernels are in kernels/sde_step.py,
kernels/ode_step.py and csrc/; they are imported on first use, never at import (TRITON_INTERPRET is read when
`@triton.jit` decorates). A kernel that cannot take the inputs hands them on, cuda -> triton -> torch: CPU tensors
without the interpreter, float64, `compute_dtype=float64`, grads into noise or sigmas, a generator on another
device; for the C++ op also mixed dtypes or B > 65535.

Conventions: sigma runs 1 -> 0, `x_sigma = (1 - sigma) x_data + sigma eps`, velocity `v ~ eps - x_data`.
`sigma`/`sigma_next` may be Python floats, 0-d tensors, or per-sample tensors of shape [B] (query states
of one batch sit at different steps). Math runs in float32 (float64 in tests); `sample`/`mean` come back in
the dtype of `x`, `log_prob` as float32 [B].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.ops.registry import Impl, Op, register, resolve
from kernels.runtime import triton_runs_on  # the rule only: no kernel module, no triton import

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class SDEStepOutput:
    """The result of an SDE step: next state, transition mean, log-prob and noise std."""

    sample: torch.Tensor
    """x' = mu + s sqrt(-dt) eps, dtype of x."""
    mean: torch.Tensor
    """mu, the transition mean, dtype of x (None from sde_step_indexed(return_mean=False))."""
    log_prob: torch.Tensor
    """log p(x'|x), mean over the non-batch dims, float32 [B]."""
    std: torch.Tensor
    """s = a sqrt(sigma / (1 - sigma~)) per sample, float32 [B] (the KL denominator is 2 s^2)."""


# --------------------------------------------------------------------------------------------- references


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
    if isinstance(sigma_1, torch.Tensor):
        sigma_1 = sigma_1.to(sigma.dtype)
    denom = 1 - torch.where(sigma == 1, sigma_1, sigma)  # a float sigma_1 stays a scalar: no host->device copy
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


def sde_step_indexed_torch(
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
    """The reference of the indexed step (same noise stream as the kernels); `out` receives x' by a copy."""
    from kernels.sde_step import sde_step_indexed_ref

    r = sde_step_indexed_ref(x, v, sigmas, step, noise_level, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance,
                             noise=noise, prev_sample=prev_sample, seed=seed, offset=offset, return_mean=return_mean)
    if out is not None:
        r = r._replace(sample=out.copy_(r.sample))
    return SDEStepOutput(sample=r.sample, mean=r.mean, log_prob=r.log_prob, std=r.std)


def ode_step_indexed_torch(
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
    """The reference of the indexed Euler step; `out` receives x' by a copy."""
    from kernels.ode_step import ode_step_indexed_ref

    r = ode_step_indexed_ref(x, v, sigmas, step, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance)
    return r if out is None else out.copy_(r)


# --------------------------------------------------------------------------------------------- what kernels take


def _tensors_ok(x: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.ndim < 2 or x.numel() == 0:
        return False
    return all(t is None or (t.shape == x.shape and t.device == x.device and t.dtype in _FLOATS) for t in others)


def _triton_takes(x: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    return _tensors_ok(x, others) and triton_runs_on(x)


def _cuda_takes(x: torch.Tensor, vels: Sequence[torch.Tensor | None], aux: torch.Tensor | None = None) -> bool:
    """The C++ op: CUDA, x and velocities of one dtype, aux in that dtype or float32, B <= 65535 (grid.y).

    (That the native ops are built and triton is importable for the backward is `available("cuda")`.)
    """
    if not (isinstance(x, torch.Tensor) and x.is_cuda and _tensors_ok(x, [*vels, aux]) and x.shape[0] <= 65535):
        return False
    same = all(t is None or t.dtype == x.dtype for t in vels)
    return same and (aux is None or aux.dtype in (x.dtype, torch.float32))


def _triton_takes_step(x: torch.Tensor, vels: Sequence[torch.Tensor | None], aux: torch.Tensor | None) -> bool:
    return _triton_takes(x, [*vels, aux])


_TAKES: dict[str, Callable[[torch.Tensor, Sequence[torch.Tensor | None], torch.Tensor | None], bool]] = {
    "cuda": _cuda_takes, "triton": _triton_takes_step}


def _index_ok(x: torch.Tensor, sigmas: torch.Tensor, step: torch.Tensor) -> bool:
    """The kernels read a float32 table and int steps on x's device (the reference also takes other dtypes)."""
    return (sigmas.dtype == torch.float32 and sigmas.device == x.device and step.device == x.device
            and step.dtype in (torch.int32, torch.int64) and step.numel() in (1, x.shape[0]))


def _no_grad_into(*values: object) -> bool:
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in values)


# --------------------------------------------------------------------------------------------- kernels


def _sde_step_kernel(backend: str) -> Impl:
    def run(x, v, sigma, sigma_next, sigma_1, noise_level, noise=None, prev_sample=None, generator=None,
            compute_dtype=torch.float32) -> SDEStepOutput:
        from kernels.sde_step import sde_step as fused

        r = fused(x, v, sigma, sigma_next, sigma_1, noise_level, noise, prev_sample, generator, backend=backend)
        return SDEStepOutput(sample=r.sample, mean=r.mean, log_prob=r.log_prob, std=r.std)

    def accepts(x, v, sigma, sigma_next, sigma_1, noise_level, noise=None, prev_sample=None, generator=None,
                compute_dtype=torch.float32) -> bool:
        aux = prev_sample if prev_sample is not None else noise
        ok = compute_dtype == torch.float32 and _no_grad_into(noise, sigma, sigma_next, sigma_1)
        ok = ok and isinstance(x, torch.Tensor)
        ok = ok and (generator is None or generator.device.type in ("cpu", x.device.type))
        return ok and _TAKES[backend](x, [v], aux)

    return Impl(run, accepts)


def _ode_step_kernel(backend: str) -> Impl:
    def run(x, v, sigma, sigma_next) -> torch.Tensor:
        from kernels.ode_step import ode_step as fused

        return fused(x, v, sigma, sigma_next, backend=backend)

    def accepts(x, v, sigma, sigma_next) -> bool:
        return _no_grad_into(sigma, sigma_next) and _TAKES[backend](x, [v], None)

    return Impl(run, accepts)


def _cfg_combine_triton(v_uncond, v_cond, scale) -> torch.Tensor:
    from kernels.ode_step import cfg_combine

    return cfg_combine(v_uncond, v_cond, scale)


def _cfg_combine_triton_takes(v_uncond, v_cond, scale) -> bool:
    if not (isinstance(v_uncond, torch.Tensor) and isinstance(v_cond, torch.Tensor)) or isinstance(scale, torch.Tensor):
        return False
    # any rank: the kernel is flat; view as [1, M] for the checks
    ok = v_uncond.shape == v_cond.shape and v_uncond.numel() > 0
    return ok and _triton_takes(v_uncond.reshape(1, -1), [v_cond.reshape(1, -1)])


def _sde_step_indexed_kernel(backend: str) -> Impl:
    def run(x, v, sigmas, step, noise_level, *, v_uncond=None, v_cond=None, guidance=1.0, noise=None,
            prev_sample=None, seed=0, offset=0, return_mean=True, out=None) -> SDEStepOutput:
        from kernels.sde_step import sde_step_indexed as fused

        r = fused(x, v, sigmas, step, noise_level, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, noise=noise,
                  prev_sample=prev_sample, seed=seed, offset=offset, return_mean=return_mean, out=out,
                  backend=backend)
        return SDEStepOutput(sample=r.sample, mean=r.mean, log_prob=r.log_prob, std=r.std)

    def accepts(x, v, sigmas, step, noise_level, *, v_uncond=None, v_cond=None, guidance=1.0, noise=None,
                prev_sample=None, seed=0, offset=0, return_mean=True, out=None) -> bool:
        aux = prev_sample if prev_sample is not None else noise
        ok = _no_grad_into(noise, sigmas) and _index_ok(x, sigmas, step)
        return ok and _TAKES[backend](x, [v, v_uncond, v_cond], aux)

    return Impl(run, accepts)


def _ode_step_indexed_kernel(backend: str) -> Impl:
    def run(x, v, sigmas, step, *, v_uncond=None, v_cond=None, guidance=1.0, out=None) -> torch.Tensor:
        from kernels.ode_step import ode_step_indexed as fused

        return fused(x, v, sigmas, step, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, out=out,
                     backend=backend)

    def accepts(x, v, sigmas, step, *, v_uncond=None, v_cond=None, guidance=1.0, out=None) -> bool:
        ok = _no_grad_into(sigmas) and _index_ok(x, sigmas, step)
        return ok and _TAKES[backend](x, [v, v_uncond, v_cond], None)

    return Impl(run, accepts)


for _name, _ref, _kernel in (("sde_step", sde_step_ref, _sde_step_kernel), ("ode_step", ode_step_ref, _ode_step_kernel),
                             ("sde_step_indexed", sde_step_indexed_torch, _sde_step_indexed_kernel),
                             ("ode_step_indexed", ode_step_indexed_torch, _ode_step_indexed_kernel)):
    register(Op(_name, _ref, {"cuda": _kernel("cuda"), "triton": _kernel("triton")}))
register(Op("cfg_combine", cfg_combine_ref, {"triton": Impl(_cfg_combine_triton, _cfg_combine_triton_takes)}))


# --------------------------------------------------------------------------------------------- entry points


def sde_step(
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
    """The SDE step with its log-prob (see `sde_step_ref`) on the backend the op table picks."""
    return resolve("sde_step")(x, v, sigma, sigma_next, sigma_1, noise_level, noise, prev_sample, generator,
                               compute_dtype)


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """The Euler step x + (sigma_next - sigma) v (see `ode_step_ref`) on the backend the op table picks."""
    return resolve("ode_step")(x, v, sigma, sigma_next)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u) on the backend the op table picks."""
    return resolve("cfg_combine")(v_uncond, v_cond, scale)


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
    return resolve("sde_step_indexed")(
        x, v, sigmas, step, noise_level, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, noise=noise,
        prev_sample=prev_sample, seed=seed, offset=offset, return_mean=return_mean, out=out)


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
    return resolve("ode_step_indexed")(
        x, v, sigmas, step, v_uncond=v_uncond, v_cond=v_cond, guidance=guidance, out=out)
