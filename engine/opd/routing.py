"""Routing: which field supervises which sample, and which prompts a step draws (DESIGN §1).

A route binds a task's prompts (its data bucket) to a field (`opd.routes`: task -> field).
- `task`: hard per sample, `routes[task tag]` (Flow-OPD's per-dataset teachers); prompts from the whole pool.
- `step` (DanceOPD, G=1): one route per optimizer step, drawn with probability proportional to
  `route_weights`, and every micro-batch of the step from that route's bucket, so one update is one route
  (danceopd/core/engine.py:124-146: rank 0 samples `router.accumulation_routes`, broadcasts it, every
  `grad_accum` micro-batch calls `dataset.sample(route.dataset)`; danceopd/core/routing.py:39-40 draws with
  `random.choices(weights=...)`). Here the draw is a pure function of (seed, step) that every rank computes
  itself: identical inputs give the identical route on every rank, which is all the broadcast guarantees, and
  unlike rank 0's `random` state it does not depend on the run's history, so a resumed run or one at another
  world size draws the same route for the same step.
- `epoch` (Flow-OPD's alternate mode): epoch e = step // epoch_steps trains only the prompts of one task,
  cycling through `epoch_counts` (task -> consecutive epochs per cycle, in order; Flow-OPD scripts/
  train_sd3_opd_mix.py:872-882 `get_current_dataset_idx`, config/grpo.py:128-157: ocr 1, geneval 3).
- `soft` (the ablation DanceOPD argues against): every sample's target is the `weights`-mix of the fields'
  velocities (normalised weights), prompts from the whole pool.
- `field_step`: one field per step drawn by `weights`, prompts from the whole pool (teacher and data unbound:
  the engine's former `step`, kept for comparison; no paper does this).

Within a bucket the sampler walks its own slot counter (`Draw.pool_step`: the steps before this one that drew the
same bucket), so each bucket is swept epoch by epoch however rarely it is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine import rng
from engine.config.schema import OPDConfig
from engine.data.prompts import Prompt
from engine.errors import RoutingError

SOFT = "soft"
"""The route label of every sample under soft routing (its target is the mix, `Router.mix`)."""


@dataclass(frozen=True)
class Draw:
    """The prompts one optimizer step draws from."""

    pool: list[int] | None
    """Prompt indices to draw from; None = the sampler's default pool (all prompts, task-weighted)."""
    key: int
    """Pool key (0 = the default pool): keys the bucket's permutations."""
    pool_step: int
    """This step's index among the steps that drew from this pool (= step for the default pool)."""


class Router:
    """Which field supervises each sample of a step, and which prompts the step draws from."""

    def __init__(self, cfg: OPDConfig, prompts: Sequence[Prompt], seed: int):
        self.cfg, self.seed = cfg, seed
        tasks = sorted({p.task for p in prompts})
        mode = cfg.routing
        if mode == "task":
            unrouted = [t for t in tasks if t not in cfg.routes]
            if unrouted:
                raise RoutingError(
                    f"prompts have task tags without a route: {unrouted}; opd.routes covers {sorted(cfg.routes)}"
                )
        self.buckets: list[str] = []
        """The routed tasks a step may be bound to (step / epoch routing), in draw / cycle order."""
        self.cycle: list[str] = []
        """Epoch routing: the task of each epoch of one cycle."""
        if mode in ("step", "epoch"):
            if mode == "epoch" and cfg.epoch_counts:
                order = [t for t, n in cfg.epoch_counts.items() if n > 0]
            else:
                order = sorted(cfg.routes)
            missing = [t for t in order if t not in tasks]
            if missing:
                raise RoutingError(f"opd.routing = {mode!r}: routed task(s) {missing} have no prompts; tasks of "
                                   f"the prompt set: {tasks}")
            self.buckets = order
            if mode == "epoch":
                counts = cfg.epoch_counts or {t: 1 for t in order}
                self.cycle = [t for t in order for _ in range(counts[t])]
        self.pools = {t: [i for i, p in enumerate(prompts) if p.task == t] for t in self.buckets}
        self._route_weights = torch.tensor([float(cfg.route_weights.get(t, 1.0)) for t in self.buckets],
                                           dtype=torch.float64)
        self._names = list(cfg.weights)
        self._weights = torch.tensor([cfg.weights[n] for n in self._names], dtype=torch.float64)
        total = float(self._weights.sum()) if self._names else 0.0
        self.mix: dict[str, float] | None = (
            {n: cfg.weights[n] / total for n in self._names if cfg.weights[n] > 0} if mode == SOFT else None
        )
        """Soft routing: field -> normalised weight of the target mix (None for hard routings)."""
        self._history: list[str] = []  # bucket of steps 0, 1, ... (memo of the pure per-step draw)

    def _bucket(self, step: int) -> str:
        """The bucket (task) step `step` is bound to under step / epoch routing: a pure function of (seed, step)."""
        if self.cfg.routing == "epoch":
            return self.cycle[(step // self.cfg.epoch_steps) % len(self.cycle)]
        gen = rng.generator(self.seed, rng.ROUTE, step)
        return self.buckets[int(torch.multinomial(self._route_weights, 1, generator=gen))]

    def bucket(self, step: int) -> str | None:
        """The task whose prompts and field step `step` trains (step / epoch routing; None for the others)."""
        if self.cfg.routing not in ("step", "epoch"):
            return None
        while len(self._history) <= step:
            self._history.append(self._bucket(len(self._history)))
        return self._history[step]

    def epoch_task(self, step: int) -> str | None:
        """The task trained at `step` under epoch routing (None for other routings)."""
        return self.bucket(step) if self.cfg.routing == "epoch" else None

    def draw(self, step: int) -> Draw:
        """The prompts step `step` draws from (the sampler's pool, its key and the bucket's own step count)."""
        task = self.bucket(step)
        if task is None:
            return Draw(None, 0, step)
        return Draw(self.pools[task], 1 + self.buckets.index(task), self._history[:step].count(task))

    def route(self, step: int, tasks: Sequence[str]) -> list[str]:
        """The field name of every sample of this step (`SOFT` for each sample under soft routing)."""
        mode = self.cfg.routing
        if mode == "task":
            return [self.cfg.routes[t] for t in tasks]
        if mode in ("step", "epoch"):
            task = self.bucket(step)
            assert task is not None
            return [self.cfg.routes[task]] * len(tasks)
        if mode == SOFT:
            return [SOFT] * len(tasks)
        idx = int(torch.multinomial(self._weights, 1, generator=rng.generator(self.seed, rng.ROUTE, step)))
        return [self._names[idx]] * len(tasks)


class NoRouting:
    """The router of an objective without fields (Flow-GRPO): every prompt of the pool, no field per sample."""

    mix: dict[str, float] | None = None
    """No soft mix."""

    def draw(self, step: int) -> Draw:
        """The whole (task-weighted) prompt pool."""
        return Draw(None, 0, step)

    def route(self, step: int, tasks: Sequence[str]) -> list[str]:
        """No field: the task tag stands in for it (logged per task)."""
        return list(tasks)
