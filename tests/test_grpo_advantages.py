"""Flow-GRPO's group-relative advantages (engine/rl/advantages.py) against an independent numpy transcription of
flow_grpo's PerPromptStatTracker (stat_tracking.py at yifan123/flow_grpo@ac4c86e) on random groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.rl.advantages import group_advantages, kept


def _tracker(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """flow_grpo's update(prompts, rewards, type='grpo') with an empty tracker, as the trainer calls it per epoch."""
    prompts_a, out = np.array(prompts), np.zeros_like(rewards)
    for p in np.unique(prompts_a):
        pr = rewards[prompts_a == p]
        std = (np.std(rewards) if global_std else np.std(pr)) + 1e-4
        out[prompts_a == p] = (pr - np.mean(pr)) / std
    return out


@pytest.mark.parametrize("global_std", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_per_prompt_matches_flow_grpo(global_std: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = [f"p{int(i)}" for i in rng.integers(0, 5, size=23)]  # odd sizes, prompts interleaved
    rewards = rng.normal(size=23) * rng.uniform(0.1, 3)
    got = group_advantages(torch.tensor(rewards), groups, per_prompt=True, global_std=global_std)
    np.testing.assert_allclose(got.numpy(), _tracker(groups, rewards, global_std), rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64


def test_global_normalisation_and_zero_groups() -> None:
    r = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5])
    got = group_advantages(r, list("aaabbb"), per_prompt=False)
    want = (r.double() - r.double().mean()) / (r.double().numpy().std() + 1e-4)
    torch.testing.assert_close(got, want)
    per = group_advantages(r, list("aaabbb"), per_prompt=True, global_std=False)
    assert torch.equal(per[3:], torch.zeros(3, dtype=torch.float64))  # equal rewards: advantage exactly 0
    assert kept(per).tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="5 group keys for 6 rewards"):
        group_advantages(r, list("aaabb"))
