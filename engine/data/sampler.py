"""Deterministic, resumable, rank-disjoint prompt order.

Global prompt slot c of (step, micro, rank, j) is `((step * accum + micro) * world + rank) * per_rank + j`;
the prompt at slot c is `perm_e[c % n]` with a fresh seeded permutation per epoch e = c // n. So a step's
prompts depend only on the step (resume needs no sampler state) and N ranks with P prompts each see exactly
the prompts one rank with N*P would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine import rng
from engine.data.prompts import Prompt


@dataclass
class Batch:
    prompt_ids: list[int]
    """Index into the prompt list per image (each prompt repeated group_size times)."""
    sample_ids: list[int]
    """Global image id per image (keys its noise and query draws)."""
    texts: list[str]
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.sample_ids)


class PromptSampler:
    def __init__(self, prompts: Sequence[Prompt], seed: int, per_rank: int, group_size: int = 1,
                 accum: int = 1, world: int = 1, rank: int = 0):
        self.prompts = list(prompts)
        self.seed, self.per_rank, self.group_size = seed, per_rank, group_size
        self.accum, self.world, self.rank = accum, world, rank
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, pool_key: int, epoch: int, n: int) -> torch.Tensor:
        key = (pool_key, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = torch.randperm(n, generator=rng.generator(self.seed, rng.DATA, pool_key, epoch))
        return self._perm_cache[key]

    def batch(self, step: int, micro: int = 0, pool: Sequence[int] | None = None, pool_key: int = 0) -> Batch:
        """This rank's images for (step, micro); `pool` restricts the draw to those prompt indices."""
        candidates = list(pool) if pool is not None else list(range(len(self.prompts)))
        if not candidates:
            raise ValueError("empty prompt pool")
        n = len(candidates)
        first = ((step * self.accum + micro) * self.world + self.rank) * self.per_rank
        prompt_ids, sample_ids = [], []
        for j in range(self.per_rank):
            c = first + j
            pid = candidates[int(self._perm(pool_key, c // n, n)[c % n])]
            for g in range(self.group_size):
                prompt_ids.append(pid)
                sample_ids.append(c * self.group_size + g)
        return Batch(
            prompt_ids=prompt_ids,
            sample_ids=sample_ids,
            texts=[self.prompts[i].text for i in prompt_ids],
            tasks=[self.prompts[i].task for i in prompt_ids],
        )
