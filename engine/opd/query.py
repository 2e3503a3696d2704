"""Query-state selection: which states of the student's rollout are trained on.

Candidates are the states x_0 .. x_{T-2} of a T-step rollout in high->low-noise order (the last transition,
into sigma = 0, is never a training state, as in Flow-GRPO/Flow-OPD).
- dense (k = 0): all T-1 candidates (Flow-OPD).
- k states per sample, drawn without replacement with bin masses of a Beta over the order:
  index int(u n) with u ~ Beta(5,2) = `low` (low-noise biased, DanceOPD), Beta(3,3) = `mid`, Beta(2,5) =
  `high`, U(0,1) = `uniform`. For k = 1 this is exactly DanceOPD's `int(u * n)` in distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine import rng

BETA_PARAMS = {"uniform": (1, 1), "low": (5, 2), "mid": (3, 3), "high": (2, 5)}


def _beta_cdf(x: float, a: int, b: int) -> float:
    """Regularised incomplete beta I_x(a, b) for integer a, b (a binomial tail, exact)."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


def bin_probabilities(n: int, bias: str) -> torch.Tensor:
    """P(int(u n) = i) for i in 0..n-1 under the bias's Beta distribution (float64, sums to 1)."""
    a, b = BETA_PARAMS[bias]
    cdf = [_beta_cdf(i / n, a, b) for i in range(n + 1)]
    return torch.tensor([cdf[i + 1] - cdf[i] for i in range(n)], dtype=torch.float64)


def select_queries(num_steps: int, sample_ids: Sequence[int], k: int, bias: str, seed: int) -> torch.Tensor:
    """State indices [B, q] (q = num_steps - 1 when dense, else k), each row sorted high -> low noise."""
    n = num_steps - 1
    if n < 1:
        raise ValueError("need at least 2 rollout steps to have a training state")
    if k == 0:
        return torch.arange(n).repeat(len(sample_ids), 1)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} query states out of {n} candidates")
    probs = bin_probabilities(n, bias)
    rows = []
    for sid in sample_ids:
        draw = torch.multinomial(probs, k, replacement=False, generator=rng.generator(seed, rng.QUERY, sid))
        rows.append(draw.sort().values)
    return torch.stack(rows)
