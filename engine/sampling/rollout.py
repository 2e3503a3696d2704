"""The student's rollout: T denoising steps with the SDE (log-probs kept) or the Euler ODE, under no_grad.

Noise is drawn per sample from counter-based seeds (engine.rng): the initial latent of global sample c is
f(seed, c) and its step-t noise f(seed, c, t), so a trajectory does not depend on the batch it ran in, the
rank that ran it, or on resuming. Two streams keep that contract:
- `SampleNoise` (the reference, `kernels.cuda_graphs = false`): one torch generator per (sample, step);
- `PhiloxNoise` (`RolloutRunner` in rollout_graph.py, `kernels.cuda_graphs = true`): the same initial latent,
  step noise from the Philox stream of kernels/philox.py keyed by (derive_seed(seed, NOISE, c), offset t), which
  the fused step kernels draw in-kernel, so a captured step needs no noise input. Its `step(t)` materialises
  that stream (float64 Box-Muller, cast to float32) for the eager `rollout()` below, so both can be compared.

`Rollout` is the interface the trainer calls, `rollout(cond, sample_ids, sigmas) -> Trajectory`; `EagerRollout`
(here) and `GraphRollout` (rollout_graph.py) implement it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine import rng
from engine.backends.base import TensorCond
from engine.fields.evaluator import FieldEvaluator
from engine.fields.field import Field
from engine.ops import ode_step, sde_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x [B, C, H, W], sigma [B]) -> v, with whatever guidance the caller applies."""


@dataclass
class Trajectory:
    """A rollout: every state, the step log-probs and the schedule."""
    states: torch.Tensor
    """[T+1, B, C, H, W] x_0 (pure noise, sigma = 1) ... x_T (the sample), float32."""
    log_probs: torch.Tensor
    """[T, B] log p(x_{t+1} | x_t) under the rollout policy (zeros for the ODE)."""
    sigmas: torch.Tensor
    """[T+1] the schedule, on the states' device."""

    @property
    def num_steps(self) -> int:
        """T, the denoising steps."""
        return self.sigmas.shape[0] - 1

    @property
    def samples(self) -> torch.Tensor:
        """x_T, the final images (latents)."""
        return self.states[-1]


class SampleNoise:
    """Per-sample Gaussian noise keyed by (seed, sample id, step)."""

    def __init__(self, seed: int, sample_ids: Sequence[int], shape: tuple[int, ...], device: torch.device):
        self.seed, self.ids, self.shape, self.device = seed, list(sample_ids), shape, device

    def _draw(self, *keys: int) -> torch.Tensor:
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        out = [
            torch.randn(self.shape, generator=rng.generator(self.seed, rng.NOISE, sid, *keys, device=gen_device),
                        device=gen_device)
            for sid in self.ids
        ]
        return torch.stack(out).to(self.device)

    def initial(self) -> torch.Tensor:
        """[B, ...] the initial latents x_0 (sigma = 1)."""
        return self._draw(-1)

    def step(self, t: int) -> torch.Tensor:
        """[B, ...] the noise of step t."""
        return self._draw(t)


class PhiloxNoise(SampleNoise):
    """`SampleNoise`'s initial latents; step-t noise of sample c = Philox(key derive_seed(seed, NOISE, c), offset t).

    One key per row, so a row's noise does not depend on its batch position (kernels/philox.py: counter word 1 is
    0 with per-row seeds) and stays a pure function of (seed, sample id, step): resume and rank splits are exact.
    """

    def row_seeds(self) -> list[int]:
        """The int64 Philox key of every row (what the fused kernels read from a device tensor)."""
        return [rng.derive_seed(self.seed, rng.NOISE, sid) for sid in self.ids]

    def step(self, t: int) -> torch.Tensor:
        """[B, ...] the Philox noise of step t, materialised (what the fused kernels draw in-kernel)."""
        from kernels.philox import philox_normal_ref  # kernel modules only on use (TRITON_INTERPRET is read then)

        seeds = torch.tensor(self.row_seeds(), dtype=torch.int64, device=self.device)
        return philox_normal_ref(seeds, t, (len(self.ids), *self.shape), self.device).float()


@torch.no_grad()
def rollout(
    velocity: VelocityFn,
    noise: SampleNoise,
    sigmas: torch.Tensor,
    sampler: str = "sde",
    noise_level: float = 0.7,
    sde_steps: Sequence[int] | None = None,
) -> Trajectory:
    """Run the T = len(sigmas) - 1 steps; `sampler` is `sde` or `ode`. With `sde_steps`, an `sde` rollout uses the
    SDE only on those steps and the Euler ODE (log-prob 0) elsewhere (Flow-GRPO-Fast's SDE window)."""
    sigmas = sigmas.to(noise.device, torch.float32)
    x = noise.initial()
    b = x.shape[0]
    states = [x]
    log_probs = []
    sigma_1 = sigmas[1]
    for t in range(sigmas.shape[0] - 1):
        sigma = sigmas[t].expand(b)
        sigma_next = sigmas[t + 1].expand(b)
        v = velocity(x, sigma).float()
        if sampler == "sde" and (sde_steps is None or t in sde_steps):
            out = sde_step(x, v, sigma, sigma_next, sigma_1, noise_level, noise=noise.step(t))
            x = out.sample
            log_probs.append(out.log_prob)
        else:
            x = ode_step(x, v, sigma, sigma_next)
            log_probs.append(torch.zeros(b, device=x.device))
        states.append(x)
    return Trajectory(states=torch.stack(states), log_probs=torch.stack(log_probs), sigmas=sigmas)


class Rollout(Protocol):
    """The student's rollout of one micro-batch, whichever runner does it."""

    def __call__(self, cond: TensorCond, sample_ids: Sequence[int], sigmas: torch.Tensor,
                 sde_steps: Sequence[int] | None = None) -> Trajectory:
        """T = len(sigmas) - 1 steps from the initial latents of `sample_ids`, conditioned on `cond` (SDE only on
        `sde_steps` when given)."""
        ...


class EagerRollout:
    """The reference runner: the field's velocity and one SDE/ODE step per denoising step, `SampleNoise` noise."""

    def __init__(self, evaluator: FieldEvaluator, field: Field, *, sampler: str, noise_level: float, seed: int,
                 latent_shape: tuple[int, ...], device: torch.device):
        self.evaluator, self.field = evaluator, field
        self.sampler, self.noise_level, self.seed = sampler, noise_level, seed
        self.latent_shape, self.device = tuple(latent_shape), device

    def __call__(self, cond: TensorCond, sample_ids: Sequence[int], sigmas: torch.Tensor,
                 sde_steps: Sequence[int] | None = None) -> Trajectory:
        """The rollout of `sample_ids` (noise keyed by (seed, sample id, step))."""
        noise = SampleNoise(self.seed, sample_ids, self.latent_shape, self.device)
        velocity = functools.partial(self.evaluator.field_velocity, self.field, cond=cond)
        return rollout(velocity, noise, sigmas, self.sampler, self.noise_level, sde_steps)
