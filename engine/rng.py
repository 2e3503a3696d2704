"""Counter-based seeds: every random draw of a run is a pure function of (seed, purpose, step, sample id).

That makes resume bit-exact without saving RNG state, and makes the samples of a global batch identical
whether it is split over 1 or N ranks (the noise of sample c never depends on which rank draws it).
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1

# purposes: distinct constants so streams never collide
DATA, ROUTE, NOISE, QUERY, INIT = 1, 2, 3, 4, 5
EVAL = 6  # evaluation noise (engine/eval/sampling.py): never a training stream, so no sample is trained on eval noise
RL = 7  # RL objectives' draws (the SDE window)
OFFPOLICY = 8  # off-policy states' endpoint noise (engine/opd/states.py)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing all `keys` (order matters)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK))
    return h & ((1 << 63) - 1)


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded by `derive_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
