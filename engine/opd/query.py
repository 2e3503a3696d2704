"""Query-state selection: which states of the student's rollout are trained on.

Candidates (`opd.query_candidates`), in high->low-noise order:
- `train`: x_0 .. x_{T-2}, the T-1 training states of Flow-GRPO / Flow-OPD (`num_train_timesteps =
  int(num_steps * timestep_fraction)` = 9 of 10 with timestep_fraction 0.99: Flow-OPD scripts/train_sd3_opd_mix.py:702,
  config/grpo.py:104; the loop `for j in range(num_train_timesteps)`, :1511).
- `all`: x_0 .. x_{T-1}, every step input, the last one included: DanceOPD draws over `n = len(trajectory)` with
  T states (danceopd/backends/sd35_diffusers.py:346, the trajectory holds the input of each of the `steps`
  steps, :196-221). The last transition (sigma_{T-1} -> 0) is a training state there: harmless for the velocity
  MSE; for the KL losses it is defined too, since Flow-GRPO's noise std s = a sqrt(sigma / (1 - sigma)) depends on
  the step's input sigma only (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:50; sigma_{T-1} = 0.0089 at
  T = 10, shift 3: s = 0.066, finite), so `transition_kl` scores it as the rollout sampled it. P(sigma < 0.3)
  of one Beta(5,2) state at T = 16: 16.7% with `all`, 5.6% with `train`.

Draws (`opd.query_states` = k, `opd.query_bias`), each a pure function of (seed, sample id):
- dense (k = 0): every candidate (Flow-OPD; DiffusionOPD with `all`).
- `uniform`, `low` = Beta(5,2), `mid` = Beta(5,5), `high` = Beta(2,5): index int(u n), k distinct indices drawn
  without replacement with the bins' masses (danceopd/core/timestep.py:49-64 redraws u until k distinct
  indices: the same successive sampling). For k = 1 this is DanceOPD's `int(u * n_states)` in distribution.
- `stratified`: one uniform draw in each of k equal strata, min(int((i + u_i) n / k), n - 1)
  (danceopd/core/timestep.py:45-47).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine import rng

BETA_PARAMS = {"uniform": (1, 1), "low": (5, 2), "mid": (5, 5), "high": (2, 5)}
"""DanceOPD's query biases (danceopd/core/timestep.py:49-54: high_t (2, 5), mid_t (5, 5), low_t (5, 2))."""


def num_candidates(num_steps: int, candidates: str) -> int:
    """How many states a T-step rollout offers under `opd.query_candidates` (T - 1 for `train`, T for `all`)."""
    if candidates not in ("train", "all"):
        raise ValueError(f"unknown query candidates {candidates!r}; valid: train, all")
    return num_steps - 1 if candidates == "train" else num_steps


def _beta_cdf(x: float, a: int, b: int) -> float:
    """Regularised incomplete beta I_x(a, b) for integer a, b (a binomial tail, exact)."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


def bin_probabilities(n: int, bias: str) -> torch.Tensor:
    """P(int(u n) = i) for i in 0..n-1 under the bias's Beta distribution (float64, sums to 1)."""
    a, b = BETA_PARAMS[bias]
    cdf = [_beta_cdf(i / n, a, b) for i in range(n + 1)]
    return torch.tensor([cdf[i + 1] - cdf[i] for i in range(n)], dtype=torch.float64)


def _stratified(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(k, generator=gen, dtype=torch.float64)
    idx = ((torch.arange(k, dtype=torch.float64) + u) * (n / k)).long().clamp(max=n - 1)
    return idx.sort().values


def select_queries(num_steps: int, sample_ids: Sequence[int], k: int, bias: str, seed: int,
                   candidates: str = "train") -> torch.Tensor:
    """State indices [B, q] (q = the number of candidates when dense, else k), each row sorted high -> low noise."""
    n = num_candidates(num_steps, candidates)
    if n < 1:
        raise ValueError("need at least 2 rollout steps to have a training state")
    if k == 0:
        return torch.arange(n).repeat(len(sample_ids), 1)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} query states out of {n} candidates")
    if bias == "stratified":
        return torch.stack([_stratified(n, k, rng.generator(seed, rng.QUERY, sid)) for sid in sample_ids])
    probs = bin_probabilities(n, bias)
    rows = []
    for sid in sample_ids:
        draw = torch.multinomial(probs, k, replacement=False, generator=rng.generator(seed, rng.QUERY, sid))
        rows.append(draw.sort().values)
    return torch.stack(rows)


def state_weight(num_queries: int, num_steps: int, weighting: str) -> float:
    """The factor on one query chunk's loss so that a step's loss (the mean over its chunks, DeepSpeed's
    accumulation) is the configured reduction over query states: 1 for `mean`; q * 0.5 / T^2 for `diffusionopd`,
    whose loss is the sum over the states of 0.5 / T^2 x the velocity MSE (danceopd/backends/sd35_diffusers.py:
    362-366; danceopd/core/methods.py:23-25: DiffusionOPD's ODE-KL, Eq. 12, on a uniform grid sum_k dt^2/2 x
    ||v_student - v_teacher||^2 with dt = 1/T)."""
    if weighting == "mean":
        return 1.0
    if weighting == "diffusionopd":
        return num_queries * 0.5 / num_steps**2
    raise ValueError(f"unknown query weighting {weighting!r}; valid: mean, diffusionopd")
