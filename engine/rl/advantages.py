"""Group-relative advantages of Flow-GRPO (flow_grpo/stat_tracking.py `PerPromptStatTracker`, scripts/train_sd3.py
lines 757-797 at yifan123/flow_grpo@ac4c86e), as pure functions of one optimizer step's rewards.

- per prompt (`per_prompt=True`, flow_grpo's `per_prompt_stat_tracking`): A = (r - mean_p) / (std_p + 1e-4) with
  mean and std over the G images of the same prompt in this step (population std, numpy's default); with
  `global_std` the denominator is the std of every reward of the step (flow_grpo's `sample.global_std`, its
  default True). The tracker is cleared after every epoch there (train_sd3.py:780), so no state crosses steps:
  a resumed step recomputes exactly the same advantages.
- global (`per_prompt=False`): A = (r - mean) / (std + 1e-4) over every reward of the step.
- A group whose rewards are all equal gets A = 0 exactly ((r - r) / (0 + 1e-4)); `kept` marks the samples whose
  advantage is not zero, the ones Flow-GRPO keeps (train_sd3.py:796-817 drops the others before training).
All of it in float64, as numpy does there. `rewards` must hold every rank's rewards of the step (gathered), in
the order of global sample ids, so 1 rank x 2P prompts equals 2 ranks x P prompts.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

STD_EPS = 1e-4  # flow_grpo/stat_tracking.py: `np.std(...) + 1e-4`


def group_advantages(rewards: torch.Tensor, groups: Sequence[Hashable], *, per_prompt: bool = True,
                     global_std: bool = True) -> torch.Tensor:
    """[N] float64 advantages of rewards [N] whose sample i belongs to prompt group `groups[i]`."""
    r = rewards.detach().to(torch.float64).reshape(-1)
    if len(groups) != r.numel():
        raise ValueError(f"{len(groups)} group keys for {r.numel()} rewards")
    if not per_prompt:
        return (r - r.mean()) / (r.std(unbiased=False) + STD_EPS)
    out = torch.empty_like(r)
    std_all = r.std(unbiased=False) + STD_EPS
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for rows in index.values():
        sel = torch.tensor(rows)
        rg = r[sel]
        std = std_all if global_std else rg.std(unbiased=False) + STD_EPS
        out[sel] = (rg - rg.mean()) / std
    return out


def kept(advantages: torch.Tensor) -> torch.Tensor:
    """[N] bool: samples with a non-zero advantage (Flow-GRPO trains only on these)."""
    return advantages != 0
