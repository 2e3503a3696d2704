"""The miniature world's analytic rewards (engine/worlds/toy/rewards.py) as scorers of engine/eval's interface,
so its prompt sets are scored through the same path as a real run's (`[validation] scorers`, engine.eval):

- `toy:task`: each image's reward for its own prompt's task (compose ~ GenEval, text ~ OCR, aesthetic ~ PickScore);
- `toy:quality`: the no-reference quality (the DeQA role), on every image.

They load nothing (`validation.scorers = {"toy:task" = ""}`); images arrive in [0, 1] and the rewards read [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.eval.scorers import register_scorer
from engine.eval.scorers.base import BaseScorer, Metadata


class ToyTaskScorer(BaseScorer):
    """The task reward of a toy prompt, [0, 1]."""

    name = "toy:task"

    def applies(self, prompt: str, metadata: Metadata) -> bool:
        """Prompts of the toy world's grammar."""
        from engine.worlds.toy.world import parse_prompt

        try:
            parse_prompt(prompt)
        except ValueError:
            return False
        return True

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] task rewards."""
        from engine.worlds.toy.rewards import task_reward

        return task_reward(images.float() * 2 - 1, list(prompts))


class ToyQualityScorer(BaseScorer):
    """The toy world's no-reference quality, [0, 1]."""

    name = "toy:quality"

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] quality scores."""
        from engine.worlds.toy.rewards import quality

        return quality(images.float() * 2 - 1)


def _no_weights(scorer: BaseScorer, path: str | Path) -> BaseScorer:
    if str(path):
        raise ValueError(f"scorer {scorer.name!r} is analytic and loads no weights; give it the path \"\" "
                         f"(got {str(path)!r})")
    return scorer


def register() -> None:
    """Register `toy:task` and `toy:quality` (called by the world plug-in)."""
    register_scorer("toy:task", lambda path, device: _no_weights(ToyTaskScorer(), path), weights="none")
    register_scorer("toy:quality", lambda path, device: _no_weights(ToyQualityScorer(), path), weights="none")
