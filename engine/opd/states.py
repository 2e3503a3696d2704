"""Off-policy query states: DanceOPD's ablation of where the states come from (`opd.states = "off_policy"`).

No student rollout: every state of the "trajectory" is the forward-noised endpoint x_sigma = (1 - sigma) x_end +
sigma eps with fresh noise per state, and the query states are picked from it as from a rollout
(danceopd/backends/sd35_diffusers.py:326-339: `method.state_source == "offline"`; prompt-only T2I rows take a
random latent endpoint, `x0 = torch.randn(...)`, :330; edit rows forward-noise the dataset's target latent,
danceopd/backends/zimage_diffsynth.py:500-506). `opd.offpolicy_endpoint = "field"` takes the routed field's own
unguided ODE sample as the endpoint, the stand-in for that dataset target where a prompt set has no images. Every
draw is keyed by (seed, sample id, state), so resume and rank splits stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import rng
from engine.sampling.rollout import Trajectory


def _normal(shape: Sequence[int], device: torch.device, *keys: int) -> torch.Tensor:
    gen_device = device if device.type == "cuda" else "cpu"
    out = torch.randn(tuple(shape), generator=rng.generator(*keys, device=gen_device), device=gen_device)
    return out.to(device)


def random_endpoints(sample_ids: Sequence[int], shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """[B, *shape] N(0, I) endpoints keyed by (seed, sample id) (DanceOPD's prompt-only T2I endpoint)."""
    return torch.stack([_normal(shape, device, seed, rng.OFFPOLICY, sid, -1) for sid in sample_ids])


def forward_noised(endpoint: torch.Tensor, sample_ids: Sequence[int], sigmas: torch.Tensor, seed: int) -> Trajectory:
    """A Trajectory whose state t is (1 - sigma_t) endpoint + sigma_t eps_t, eps_t fresh per (sample, t); no
    log-probs (zeros: off-policy states have no rollout policy)."""
    sigmas = sigmas.to(endpoint.device, torch.float32)
    shape = endpoint.shape[1:]
    states = []
    for t in range(sigmas.shape[0]):
        eps = torch.stack([_normal(shape, endpoint.device, seed, rng.OFFPOLICY, sid, t) for sid in sample_ids])
        states.append((1 - sigmas[t]) * endpoint.float() + sigmas[t] * eps)
    log_probs = torch.zeros(sigmas.shape[0] - 1, endpoint.shape[0], device=endpoint.device)
    return Trajectory(states=torch.stack(states), log_probs=log_probs, sigmas=sigmas)
