"""Task rewards of one optimizer step's rollouts, normalised per prompt group over every rank.

Shared by Flow-GRPO (engine/rl/objective.py) and Flow-OPD's `mixed` OPD mode (engine/opd/objective.py): both
score each micro-batch's final images with the `[rl]` reward model, gather (sample id, prompt id, micro-batch,
reward) from every rank, sort by global sample id (so the numbers do not depend on how the batch is split over
ranks), normalise per prompt group (flow_grpo's PerPromptStatTracker, or its `global_std` option) and attach to
each micro-batch: `advantages` [B] float64, `keep` [B] (not a zero-advantage group, when `rl.filter_zero`), and
`normalizer` (the kept samples of the micro-batch over every rank, per rank: DeepSpeed averages over ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.config.rl_schema import RLConfig
from engine.objective import MicroBatch
from engine.rl.advantages import group_advantages, kept
from engine.rl.rewards import RewardModel

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Every rank's tensor of the same shape, concatenated in rank order (the identity with one rank)."""
Decode = Callable[[torch.Tensor], torch.Tensor]
"""latents -> images [B, 3, H, W] in [0, 1]."""


class StepRewards:
    """Rewards -> per-group advantages for the micro-batches of one optimizer step (see the module docstring)."""

    def __init__(self, cfg: RLConfig, reward: RewardModel, decode: Decode, gather: Gather, device: torch.device):
        self.cfg, self.reward, self.decode, self.gather, self.device = cfg, reward, decode, gather, device

    def __call__(self, micros: Sequence[MicroBatch]) -> dict[str, float]:
        """Score and normalise; attach `advantages`, `keep`, `normalizer` to each micro-batch's `extra`; returns
        the step's reward scalars to log (reward, reward_std, zero_adv, reward/<scorer>)."""
        rewards, means = [], {}
        for m in micros:
            r, part = self.reward(self.decode(m.traj.samples), m.prompts, m.tasks)
            rewards.append(r)
            for k, v in part.items():
                means.setdefault(k, []).append(v)
        local = torch.cat(rewards)
        ids = torch.tensor([i for m in micros for i in m.sample_ids], dtype=torch.float64)
        groups = torch.tensor([p for m in micros for p in m.prompt_ids], dtype=torch.float64)
        index = torch.tensor([m.index for m in micros for _ in m.sample_ids], dtype=torch.float64)
        packed = self.gather(torch.stack([ids, groups, index, local]).to(self.device)).cpu()
        world = packed.shape[1] // ids.numel()
        order = torch.argsort(packed[0])  # global sample-id order: the same numbers for any rank split
        all_ids, all_groups, all_micro, all_r = (row[order] for row in packed)
        adv = group_advantages(all_r, all_groups.long().tolist(), per_prompt=self.cfg.per_prompt,
                               global_std=self.cfg.global_std)
        keep_all = kept(adv) if self.cfg.filter_zero else torch.ones_like(adv, dtype=torch.bool)
        by_id = dict(zip(all_ids.long().tolist(), zip(adv.tolist(), keep_all.tolist())))
        for m in micros:
            a, k = zip(*(by_id[i] for i in m.sample_ids))
            m.extra["advantages"] = torch.tensor(a, dtype=torch.float64, device=self.device)
            m.extra["keep"] = torch.tensor(k, dtype=torch.bool, device=self.device)
            m.extra["normalizer"] = float(keep_all[all_micro == m.index].sum()) / world
        out = {"reward": float(all_r.mean()), "reward_std": float(all_r.std(unbiased=False)),
               "zero_adv": float((adv == 0).double().mean())}
        out.update({f"reward/{k}": sum(v) / len(v) for k, v in means.items()})
        return out
