"""The sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler(shift), reproduced exactly.

diffusers builds it in two passes: the training sigmas are shifted once (which moves sigma_min to
shift/N / (1 + (shift-1)/N)), `set_timesteps` spaces timesteps linearly between the *shifted* training
extremes and shifts again. We copy that (float64 numpy, then float32) so that `tests/test_schedule.py`
can demand bit equality with the scheduler.
"""

from __future__ import annotations

import numpy as np
import torch


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas for `num_steps` denoising steps, from 1 (noise) down to 0, length `num_steps + 1` (float32)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # the scheduler's __init__ shifts its training sigmas in float32 torch and keeps the extremes as floats
    train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    train_sigmas = _shift(train / num_train_timesteps, shift)
    t_max = train_sigmas[0].item() * num_train_timesteps
    t_min = train_sigmas[-1].item() * num_train_timesteps
    timesteps = np.linspace(t_max, t_min, num_steps)
    sigmas = _shift(timesteps / num_train_timesteps, shift)
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])
