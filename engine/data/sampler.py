"""Deterministic, resumable, rank-disjoint prompt order.

Global prompt slot c of (step, micro, rank, j) is `((step * accum + micro) * world + rank) * per_rank + j`;
the prompt at slot c is `perm_e[c % n]` with a fresh seeded permutation per epoch e = c // n. So a step's
prompts depend only on the step (resume needs no sampler state) and N ranks with P prompts each see exactly
the prompts one rank with N*P would. A route's bucket (engine/opd/routing.py) is drawn the same way on its own
slot counter (the bucket's step count instead of the step), while sample ids stay the global slots.

Task weights (`data.task_weights`) reshape the epoch instead of the draw: task t fills a share w_t / sum(w) of
a virtual epoch, its prompts cycled in order to fill it (the miniature world has 42 compose, 74 text and 16
aesthetic prompts: equal weights give each task 74 slots per epoch, so aesthetic is drawn 4.6x as often as
uniform sampling would). The draw stays a pure function of the slot, so the guarantees above hold unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engine import rng
from engine.data.prompts import Prompt


@dataclass
class Batch:
    """One rank's images of a micro-batch: prompt ids, global sample ids, texts, tasks."""
    prompt_ids: list[int]
    """Index into the prompt list per image (each prompt repeated group_size times)."""
    sample_ids: list[int]
    """Global image id per image (keys its noise and query draws)."""
    texts: list[str]
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.sample_ids)


def weighted_pool(prompts: Sequence[Prompt], task_weights: Mapping[str, float]) -> list[int]:
    """Prompt indices of one virtual epoch: task t gets round(w_t / max_w * n_max) slots (n_max: the size of the
    largest task among those with the largest weight), its prompts cycled in their file order."""
    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(p.task, []).append(i)
    missing = sorted(set(by_task) - set(task_weights))
    if missing:
        raise ValueError(f"data.task_weights has no weight for task(s) {missing} of the prompt set "
                         f"(tasks: {sorted(by_task)}); give them a weight (0 leaves them out)")
    present = {t: float(task_weights[t]) for t in by_task}
    top = max(present.values(), default=0.0)
    if top <= 0:
        raise ValueError(f"data.task_weights gives no task of the prompt set a positive weight: {present}")
    n_max = max(len(by_task[t]) for t, w in present.items() if w == top)
    pool: list[int] = []
    for t in sorted(by_task):
        slots = round(present[t] / top * n_max)
        if present[t] > 0:
            slots = max(slots, 1)
        ids = by_task[t]
        pool += [ids[k % len(ids)] for k in range(slots)]
    return pool


class PromptSampler:
    """The prompts of (step, micro, rank) as a pure function of the seed (see the module docstring)."""
    def __init__(self, prompts: Sequence[Prompt], seed: int, per_rank: int, group_size: int = 1,
                 accum: int = 1, world: int = 1, rank: int = 0, task_weights: Mapping[str, float] | None = None):
        self.prompts = list(prompts)
        self.seed, self.per_rank, self.group_size = seed, per_rank, group_size
        self.accum, self.world, self.rank = accum, world, rank
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.default_pool = weighted_pool(self.prompts, task_weights) if task_weights else None

    def _perm(self, pool_key: int, epoch: int, n: int) -> torch.Tensor:
        key = (pool_key, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = torch.randperm(n, generator=rng.generator(self.seed, rng.DATA, pool_key, epoch))
        return self._perm_cache[key]

    def _slot(self, step: int, micro: int) -> int:
        """The first global prompt slot of this rank's share of (step, micro)."""
        return ((step * self.accum + micro) * self.world + self.rank) * self.per_rank

    def batch(self, step: int, micro: int = 0, pool: Sequence[int] | None = None, pool_key: int = 0,
              pool_step: int | None = None) -> Batch:
        """This rank's images for (step, micro); `pool` restricts the draw to those prompt indices (a route's
        bucket) and `pool_step` (default: `step`) is the step's index among the steps drawing from that pool, so a
        bucket's slots run on its own counter however rarely it is drawn."""
        if pool is not None:
            candidates = list(pool)
        else:
            candidates = self.default_pool if self.default_pool is not None else list(range(len(self.prompts)))
        if not candidates:
            raise ValueError("empty prompt pool")
        n = len(candidates)
        first = self._slot(step, micro)
        first_in_pool = first if pool_step is None else self._slot(pool_step, micro)
        prompt_ids, sample_ids = [], []
        for j in range(self.per_rank):
            c = first_in_pool + j
            pid = candidates[int(self._perm(pool_key, c // n, n)[c % n])]
            for g in range(self.group_size):
                prompt_ids.append(pid)
                # sample ids (noise and query keys) stay global slots: unique over the run whatever the pool
                sample_ids.append((first + j) * self.group_size + g)
        return Batch(
            prompt_ids=prompt_ids,
            sample_ids=sample_ids,
            texts=[self.prompts[i].text for i in prompt_ids],
            tasks=[self.prompts[i].task for i in prompt_ids],
        )
