from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.backends.sd3.backend import sigma_to_timestep
from engine.sampling.schedule import flow_match_sigmas


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 16, 28, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigmas_equal_diffusers_bit_for_bit(steps: int, shift: float) -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_match_sigmas(steps, shift)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(sigma_to_timestep(ours[:-1]), sched.timesteps)


def test_paper_schedule_values() -> None:
    # DESIGN §1: 10 steps at shift 3
    expected = [1, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0]
    assert flow_match_sigmas(10, 3.0).tolist() == pytest.approx(expected, abs=6e-4)


def test_invalid_steps() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        flow_match_sigmas(0)
