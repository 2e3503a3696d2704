"""Routing: which field supervises which sample (DESIGN §1; hard routing beats soft mixing in DanceOPD).

- `task`: hard per sample, `routes[task tag]` (Flow-OPD routes by prompt dataset).
- `step`: one field per optimizer step for all samples, drawn with probability proportional to `weights`.
- `epoch`: per-epoch alternation by dataset: epoch e = step // epoch_steps trains only on prompts of task
  `tasks[e % T]` (sorted route keys), supervised by that task's field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import rng
from engine.config.schema import OPDConfig
from engine.data.prompts import Prompt
from engine.errors import RoutingError


class Router:
    """Which field supervises each sample of a step, and which prompts a step draws from (epoch routing)."""

    def __init__(self, cfg: OPDConfig, prompts: Sequence[Prompt], seed: int):
        self.cfg, self.seed = cfg, seed
        tasks = sorted({p.task for p in prompts})
        if cfg.routing in ("task", "epoch"):
            unrouted = [t for t in tasks if t not in cfg.routes]
            if unrouted and cfg.routing == "task":
                raise RoutingError(
                    f"prompts have task tags without a route: {unrouted}; opd.routes covers {sorted(cfg.routes)}"
                )
            self.epoch_tasks = [t for t in sorted(cfg.routes) if t in tasks]
            if cfg.routing == "epoch" and not self.epoch_tasks:
                raise RoutingError(f"no prompt has a task in opd.routes ({sorted(cfg.routes)}); tasks: {tasks}")
            self.pools = {t: [i for i, p in enumerate(prompts) if p.task == t] for t in self.epoch_tasks}
        names = list(cfg.weights)
        self._names = names
        self._weights = torch.tensor([cfg.weights[n] for n in names], dtype=torch.float64) if names else None

    def epoch_task(self, step: int) -> str | None:
        """The task trained at `step` under epoch routing (None for other routings)."""
        if self.cfg.routing != "epoch":
            return None
        return self.epoch_tasks[(step // self.cfg.epoch_steps) % len(self.epoch_tasks)]

    def pool(self, step: int) -> tuple[list[int] | None, int]:
        """(prompt indices to draw from, pool key) for the sampler at `step`."""
        task = self.epoch_task(step)
        if task is None:
            return None, 0
        return self.pools[task], 1 + self.epoch_tasks.index(task)

    def route(self, step: int, tasks: Sequence[str]) -> list[str]:
        """The field name of every sample of this step."""
        mode = self.cfg.routing
        if mode == "task":
            return [self.cfg.routes[t] for t in tasks]
        if mode == "epoch":
            task = self.epoch_task(step)
            assert task is not None
            return [self.cfg.routes[task]] * len(tasks)
        assert self._weights is not None
        idx = int(torch.multinomial(self._weights, 1, generator=rng.generator(self.seed, rng.ROUTE, step)))
        return [self._names[idx]] * len(tasks)


class NoRouting:
    """The router of an objective without fields (Flow-GRPO): every prompt of the pool, no field per sample."""

    def pool(self, step: int) -> tuple[list[int] | None, int]:
        """The whole (task-weighted) prompt pool."""
        return None, 0

    def route(self, step: int, tasks: Sequence[str]) -> list[str]:
        """No field: the task tag stands in for it (logged per task)."""
        return list(tasks)
