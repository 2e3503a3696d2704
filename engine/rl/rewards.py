"""Rewards of the student's final images for an RL objective: each image's reward is the weighted sum of its task's
scorers (`rl.rewards`: task -> {scorer: weight}, `*` for every other task), the scorers being the plug-ins of
engine/eval/scorers (flow_grpo's `multi_score`: a weighted sum of reward functions, flow_grpo/rewards.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from engine.config.rl_schema import ALL_TASKS, RLConfig
from engine.eval.scorers import build_scorer
from engine.eval.scorers.base import Scorer


class RewardModel:
    """Per-image rewards from named scorers, weighted per task."""

    def __init__(self, rewards: Mapping[str, Mapping[str, float]], scorers: Mapping[str, Scorer]):
        self.rewards = {t: dict(w) for t, w in rewards.items()}
        self.scorers = dict(scorers)

    @classmethod
    def from_config(cls, cfg: RLConfig, device: torch.device) -> RewardModel:
        """The scorers of `cfg.scorers` loaded onto `device` (or the CPU with scorer_device = cpu)."""
        where = torch.device("cpu") if cfg.scorer_device == "cpu" else device
        used = {name for weights in cfg.rewards.values() for name in weights}
        return cls(cfg.rewards, {name: build_scorer(name, cfg.scorers[name], where) for name in sorted(used)})

    def weights(self, task: str) -> dict[str, float]:
        """The scorer weights of `task`; KeyError naming the task when neither it nor `*` has an entry."""
        if task in self.rewards:
            return self.rewards[task]
        if ALL_TASKS in self.rewards:
            return self.rewards[ALL_TASKS]
        raise KeyError(f"rl.rewards has no entry for task {task!r} (nor {ALL_TASKS!r}); tasks: {sorted(self.rewards)}")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 tasks: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """([B] float64 rewards, {scorer: mean score over the images it scored}) of `images` [B, 3, H, W] in [0, 1]."""
        total = np.zeros(len(prompts), dtype=np.float64)
        means: dict[str, float] = {}
        for name, scorer in self.scorers.items():
            rows = [i for i, t in enumerate(tasks) if name in self.weights(t)]
            if not rows:
                continue
            meta = [{"task": tasks[i]} for i in rows]
            bad = [prompts[i] for i, m in zip(rows, meta) if not scorer.applies(prompts[i], m)]
            if bad:
                raise ValueError(f"rl.rewards: scorer {name!r} cannot score the prompt {bad[0]!r} (task "
                                 f"{tasks[rows[0]]!r}); give that task another scorer")
            scores = np.asarray(scorer.score(images[rows], [prompts[i] for i in rows], meta), dtype=np.float64)
            for k, i in enumerate(rows):
                total[i] += self.weights(tasks[i])[name] * scores[k]
            means[name] = float(scores.mean())
        return torch.from_numpy(total), means
