"""[rl]: reinforcement learning from rewards instead of distillation (engine/rl, docs/grpo.md): Flow-GRPO.

Kept beside `schema.py` (which imports it into `Config`); `problems()` is pure: scorer names are checked against
the scorer registry by engine/config/load.py and scorer paths by the preflight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.checks import choice, need, need_num

RL_LOSSES = ("", "grpo")
SCORER_DEVICES = ("train", "cpu")
ALL_TASKS = "*"


@dataclass
class RLConfig:
    """[rl]: Flow-GRPO (yifan123/flow_grpo scripts/train_sd3.py): SDE rollouts, rewards of the final images,
    group-relative advantages, the clipped policy loss on every training state; makes experts from rewards."""

    loss: str = ""
    """"" = the [opd] objective (distillation); grpo = Flow-GRPO (the [opd] table and the fields are then unused
    but for `reference`)."""
    rewards: dict[str, dict[str, float]] = field(default_factory=dict)
    """Task tag -> {scorer name: weight}: each image's reward is the weighted sum of its task's scorers (`*` = the
    entry for every task without its own); GRPO-Mix = several tasks with their own rewards, mixed by
    data.task_weights."""
    scorers: dict[str, str] = field(default_factory=dict)
    """Scorer name -> its local weights dir ("" for scorers without weights, e.g. a miniature world's `toy:task`);
    every scorer named in `rewards` needs an entry."""
    scorer_device: str = "train"
    """Where the reward scorers run: train (the training device) or cpu."""
    clip_range: float = 1e-4
    """PPO ratio clip (flow_grpo train.clip_range)."""
    adv_clip: float = 5.0
    """Advantage clamp (flow_grpo train.adv_clip_max)."""
    beta: float = 0.0
    """KL to the reference policy on the transition mean, mean (mu - mu_ref)^2 / (2 s^2) (flow_grpo train.beta)."""
    reference: str = ""
    """The reference policy of the KL: a field name from [[fields]]; empty = the base (adapters disabled), as
    flow_grpo's `disable_adapter()`."""
    per_prompt: bool = True
    """Normalise rewards per prompt group (flow_grpo per_prompt_stat_tracking); false = over the whole step."""
    global_std: bool = True
    """Per-prompt advantages divide by the std of every reward of the step (flow_grpo sample.global_std)."""
    filter_zero: bool = True
    """Train only on samples with a non-zero advantage (flow_grpo drops groups whose rewards are all equal)."""
    timestep_fraction: float = 1.0
    """Train on the first int(fraction x (T - 1)) transitions (the last, into sigma 0, is never trained: its
    log-prob is ill-conditioned; flow_grpo's Fast code excludes it too)."""
    sde_window: int = 0
    """Flow-GRPO-Fast: the rollout uses the SDE only on a window of this many consecutive steps (ODE elsewhere)
    and trains on them; 0 = SDE on every step."""
    sde_window_range: list[int] = field(default_factory=list)
    """[lo, hi]: the window starts uniformly in [lo, hi - sde_window] (drawn per optimizer step from the seed);
    empty = [0, rollout.steps // 2]."""

    def problems(self, rollout_steps: int) -> list[str]:
        """Impossible values of [rl] given the rollout's step count."""
        p: list[str] = []
        choice(p, "rl.loss", self.loss, RL_LOSSES)
        choice(p, "rl.scorer_device", self.scorer_device, SCORER_DEVICES)
        need_num(p, "rl.clip_range", self.clip_range, self.clip_range > 0, "must be > 0")
        need_num(p, "rl.adv_clip", self.adv_clip, self.adv_clip > 0, "must be > 0")
        need_num(p, "rl.beta", self.beta, self.beta >= 0, "must be >= 0")
        need_num(p, "rl.timestep_fraction", self.timestep_fraction, 0 < self.timestep_fraction <= 1,
                 "must be in (0, 1]")
        for task, weights in self.rewards.items():
            if not weights:
                p.append(f"rl.rewards.{task} is empty: give it at least one scorer")
            for name, w in weights.items():
                need_num(p, f"rl.rewards.{task}.{name}", w, True, "")
                if name not in self.scorers:
                    p.append(f"rl.rewards.{task}.{name}: scorer {name!r} has no entry in rl.scorers "
                             f"(its weights dir, or \"\")")
        if self.loss and not self.rewards:
            p.append(f"rl.loss = {self.loss!r} needs rl.rewards (task -> {{scorer: weight}})")
        top = rollout_steps - 1
        need(p, "rl.sde_window", self.sde_window, 0 <= self.sde_window <= top, f"must be in 0..{top}")
        if self.sde_window_range:
            lo_hi = self.sde_window_range
            ok = len(lo_hi) == 2 and 0 <= lo_hi[0] and lo_hi[0] + self.sde_window <= lo_hi[1] <= top
            need(p, "rl.sde_window_range", lo_hi, ok, f"must be [lo, hi] with 0 <= lo, lo + sde_window <= hi <= {top}")
        return p
