"""[opd]: the OPD objective's section of the config (loss, routing, anchor, query states, state source, diagnostics).

Kept beside engine/config/schema.py (which imports it into `Config`) so each file stays small. docs/config.md says
which method each value reproduces; docs/ablations.md measures them in the miniature world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.config.checks import choice, need, need_num

LOSSES = ("mse", "gkd", "kl_only", "rkl_pg", "mixed")  # built in (engine/opd/losses.py registers them and others)
ROUTINGS = ("task", "step", "epoch", "soft", "field_step")
QUERY_BIAS = ("uniform", "low", "mid", "high", "stratified")
QUERY_CANDIDATES = ("train", "all")
QUERY_WEIGHTINGS = ("mean", "diffusionopd")
STATE_SOURCES = ("on_policy", "off_policy")
OFFPOLICY_ENDPOINTS = ("random", "field")
FIELD_EVALUATORS = ("reference", "batched")
RATIO_LOSSES = ("kl_only", "rkl_pg", "mixed")
"""Losses that re-score the rollout's log-probs (need SDE rollouts)."""


class RolloutLike(Protocol):
    """What [opd]'s checks read of [rollout] (engine.config.schema.RolloutConfig)."""

    steps: int
    sampler: str
    noise_level: float
    group_size: int


@dataclass
class OPDConfig:
    """[opd]: loss, routing, anchor, query states, state source, field evaluation."""
    loss: str = "gkd"
    """mse (DanceOPD velocity MSE), gkd (Flow-OPD transition KL), kl_only (Flow-OPD's shipped clipped-ratio
    objective), rkl_pg (reverse-KL policy gradient on the student's own transitions; no paper has it), mixed
    (Flow-OPD's `reward_mode = "mixed"`: kl_only with the task advantage of the final image added to A; the
    rewards are `[rl] rewards` / `scorers`, normalised per prompt group as `rl.per_prompt` / `rl.global_std` say)."""
    advantage_grad: bool = True
    """kl_only: keep the advantage A = clamp(-kl, +-adv_clip) attached to the graph, as Flow-OPD's code does
    (gradient r grad(KL) + KL grad(r)); false detaches it (DanceOPD's re-implementation): then E[KL grad log p] = 0
    and only noise and the anchor train: the zero-mean ablation."""
    advantage_pairs: bool = True
    """kl_only: average the clipped objective over all B x B pairs (A_i, r_j) of a chunk, as Flow-OPD's code
    does (its A has shape [B, 1] against r's [B]: scripts/train_sd3_opd_mix.py:1671, 1755): the score term then
    weights every sample's grad log p by the batch-mean KL; false = per sample (A_i r_i, the paper's formula and
    DanceOPD's re-implementation). Both give the same pathwise gradient at r = 1."""
    routing: str = "task"
    """task (hard per sample by task tag), step (DanceOPD G=1: one route per optimizer step drawn by
    `route_weights`, every micro-batch from that route's prompts), epoch (Flow-OPD: one task per epoch of
    `epoch_steps` steps, alternating with `epoch_counts`), soft (target = the `weights`-mix of the fields'
    velocities, prompts from the whole pool: the ablation), field_step (one field per step drawn by `weights`,
    prompts from the whole pool: the engine's old `step`, teacher and data unbound)."""
    routes: dict[str, str] = field(default_factory=dict)
    """task tag -> field name (routing task/step/epoch): a route is a task's prompts bound to its field."""
    route_weights: dict[str, float] = field(default_factory=dict)
    """task tag -> probability weight of its route per optimizer step (routing step); empty = equal weights over
    the routed tasks (DanceOPD's default weight 1.0 each)."""
    weights: dict[str, float] = field(default_factory=dict)
    """field name -> weight (routing soft: mixing weights, normalised; routing field_step: draw weights)."""
    epoch_steps: int = 10
    """Optimizer steps per epoch for routing = epoch (Flow-OPD: 2, its num_batches_per_epoch / grad accum)."""
    epoch_counts: dict[str, int] = field(default_factory=dict)
    """task tag -> consecutive epochs per cycle for routing = epoch, in cycle order (Flow-OPD: {ocr = 1,
    geneval = 3}); empty = 1 epoch per routed task, sorted by task."""
    anchor: str = ""
    """Field of the MAR anchor term (e.g. the base); empty = no anchor."""
    beta: float = 0.04
    """Weight of the anchor term."""
    query_states: int = 0
    """States per sample that the student is trained on: 0 = dense (every candidate state), else k."""
    query_bias: str = "uniform"
    """Where k states are drawn over the high->low-noise order of the candidates: uniform, low (Beta(5,2)), mid
    (Beta(5,5)), high (Beta(2,5)) as DanceOPD's int(u n); stratified (one draw in each of k equal strata)."""
    query_candidates: str = "train"
    """train: the T-1 states x_0..x_{T-2} (Flow-OPD trains 9 of 10, timestep_fraction 0.99); all: all T step
    inputs x_0..x_{T-1}, the last one (sigma_{T-1} -> 0) included (DanceOPD's n = len(trajectory))."""
    query_weighting: str = "mean"
    """mean: a step's loss is the mean over its query states; diffusionopd: the sum over them with weight
    0.5 / T^2 each (DiffusionOPD's dense ODE-KL as DanceOPD implements it)."""
    states: str = "on_policy"
    """on_policy: query states from the student's own rollout; off_policy: DanceOPD's ablation, no rollout, each
    query state forward-noised from an endpoint (`offpolicy_endpoint`) with fresh noise."""
    offpolicy_endpoint: str = "random"
    """Endpoint of off_policy states: random (a N(0, I) latent: DanceOPD's prompt-only T2I rows) or field (the
    routed field's own unguided ODE sample: the stand-in for the dataset target DanceOPD uses on edit rows)."""
    student_cfg: float = 1.0
    """Guidance applied to the student's velocity in the loss (Flow-OPD: both sides guided, 4.5)."""
    clip_range: float = 1e-4
    """PPO ratio clip of kl_only and rkl_pg."""
    adv_clip: float = 5.0
    """Advantage clamp of kl_only and rkl_pg: A = clamp(-kl, -adv_clip, adv_clip); a sample whose KL exceeds it
    keeps A = -adv_clip and loses its pathwise gradient (the clamp's slope is 0 there), as in Flow-OPD."""
    rkl_pathwise: float = 0.0
    """rkl_pg: weight of the pathwise transition-KL term (gkd's) added to the policy gradient."""
    grad_diagnostic: int = 0
    """Every N optimizer steps log the norms of the pathwise and score-function parts of the student gradient
    and their cosine (grad/pathwise, grad/score, grad/cos); 0 = off. Costs two extra backward passes per query
    chunk on those steps."""
    evaluator: str = "reference"
    """Field evaluation: reference (one forward per field, peft adapters switched) or batched (one forward)."""

    def problems(self, fields: list[str], rollout: RolloutLike) -> list[str]:
        """Impossible values of [opd] given the field names and the rollout."""
        p: list[str] = []  # opd.loss names are checked against the loss registry (engine.config.load.validate)
        for key, valid in (("routing", ROUTINGS), ("query_bias", QUERY_BIAS), ("query_candidates", QUERY_CANDIDATES),
                           ("query_weighting", QUERY_WEIGHTINGS), ("states", STATE_SOURCES),
                           ("offpolicy_endpoint", OFFPOLICY_ENDPOINTS), ("evaluator", FIELD_EVALUATORS)):
            choice(p, f"opd.{key}", getattr(self, key), valid)
        known = ", ".join(fields) or "(none)"
        for task, name in self.routes.items():
            if name not in fields:
                p.append(f"opd.routes.{task} = {name!r}: unknown field; valid: {known}")
        for name, w in self.weights.items():
            if name not in fields:
                p.append(f"opd.weights.{name}: unknown field; valid: {known}")
            need_num(p, f"opd.weights.{name}", w, w >= 0, "must be >= 0")
        for task, w in self.route_weights.items():
            if task not in self.routes:
                p.append(f"opd.route_weights.{task}: no route for this task; opd.routes has {sorted(self.routes)}")
            need_num(p, f"opd.route_weights.{task}", w, w >= 0, "must be >= 0")
        for task, n in self.epoch_counts.items():
            if task not in self.routes:
                p.append(f"opd.epoch_counts.{task}: no route for this task; opd.routes has {sorted(self.routes)}")
            need(p, f"opd.epoch_counts.{task}", n, n >= 0, "must be >= 0 epochs per cycle")
        if self.routing in ("task", "step", "epoch") and not self.routes:
            p.append(f"opd.routing = {self.routing!r} needs opd.routes (task -> field)")
        if self.routing in ("soft", "field_step") and (not self.weights or sum(self.weights.values()) <= 0):
            p.append(f"opd.routing = {self.routing!r} needs opd.weights (field -> weight) with a positive sum")
        if self.routing == "step" and self.route_weights and sum(self.route_weights.values()) <= 0:
            p.append("opd.route_weights: every weight is 0; give at least one route a positive weight")
        if self.routing == "epoch" and self.epoch_counts and sum(self.epoch_counts.values()) <= 0:
            p.append("opd.epoch_counts: every count is 0; give at least one task an epoch per cycle")
        need(p, "opd.epoch_steps", self.epoch_steps, self.epoch_steps >= 1, "must be >= 1")
        if self.anchor and self.anchor not in fields:
            p.append(f"opd.anchor = {self.anchor!r}: unknown field; valid: {known}")
        need_num(p, "opd.beta", self.beta, self.beta >= 0, "must be >= 0")
        top = max(rollout.steps - (1 if self.query_candidates == "train" else 0), 1)
        need(p, "opd.query_states", self.query_states, 0 <= self.query_states <= top,
             f"must be 0 (dense) or 1..{top} (opd.query_candidates = {self.query_candidates!r})")
        need_num(p, "opd.student_cfg", self.student_cfg, self.student_cfg >= 0, "must be >= 0")
        need_num(p, "opd.clip_range", self.clip_range, self.clip_range > 0, "must be > 0")
        need_num(p, "opd.adv_clip", self.adv_clip, self.adv_clip > 0, "must be > 0")
        need_num(p, "opd.rkl_pathwise", self.rkl_pathwise, self.rkl_pathwise >= 0, "must be >= 0")
        need(p, "opd.grad_diagnostic", self.grad_diagnostic, self.grad_diagnostic >= 0, "must be >= 0 (0 = off)")
        if self.loss in RATIO_LOSSES and rollout.sampler != "sde":
            p.append(f"opd.loss = {self.loss!r} needs rollout.sampler = 'sde' (it re-scores the rollout's log-probs)")
        if self.loss in RATIO_LOSSES and self.states == "off_policy":
            p.append(f"opd.loss = {self.loss!r} needs opd.states = 'on_policy' (off-policy states have no "
                     f"rollout log-probs)")
        if self.loss in ("rkl_pg", "mixed") and rollout.group_size < 2:
            p.append(f"opd.loss = {self.loss!r} normalises rewards per prompt group: rollout.group_size = "
                     f"{rollout.group_size}; must be >= 2")
        if self.loss in ("gkd", *RATIO_LOSSES) and rollout.noise_level <= 0:
            p.append(f"opd.loss = {self.loss!r} needs rollout.noise_level > 0 (the KL divides by s^2)")
        return p
