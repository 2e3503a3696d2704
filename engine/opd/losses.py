"""OPD losses (DESIGN §1). One call scores one chunk of query states (B rows, one state each).

- `mse` (DanceOPD): mean ||v_theta - v_F||^2 over all elements, no sigma weighting; anchor term the same.
- `gkd` (Flow-OPD): per-sample transition KL kl = mean_CHW (mu_theta - mu_F)^2 / (2 s^2), loss = mean(kl)
  + beta mean(kl_anchor). Both means come from the same SDE step at the same state, so
  mu_theta - mu_F = (1 + s^2 (1 - sigma) / (2 sigma)) dt (v_theta - v_F).
- `kl_only` (Flow-OPD's shipped configs): PPO-style clipped objective on the student's own log-probs with
  advantage A = clamp(-kl, +-adv_clip), attached (gradient r grad(KL) + KL grad(r)), and ratio
  exp(logp_theta - logp_old) clipped to 1 +- clip_range, plus beta mean(kl_anchor); `opd.advantage_grad = false`
  is the detached, zero-mean ablation.
- `rkl_pg` (this engine's): the policy gradient of the reverse KL with the per-step reward
  log p_T(x'|x) - log p_theta(x'|x) of the sampled transition, group-normalised, in the clipped ratio.
- `mixed` (Flow-OPD's `reward_mode = "mixed"`): `kl_only` with A = clamp(clamp(task advantage, +-adv_clip) - kl,
  +-adv_clip), the task advantage of the sample's final image normalised per prompt group (the `[rl]` rewards:
  engine/rl/step_rewards.py), the same at every state of the trajectory.

Losses are looked up by name in `LOSSES` (`register_loss` adds one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.config.schema import OPDConfig
from engine.ops import sde_step


@dataclass
class Transition:
    """The query states of a chunk: x at sigma, the stored next state and the rollout's log-prob."""

    x: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor
    """[B]"""
    sigma_next: torch.Tensor
    """[B]"""
    sigma_1: float
    noise_level: float
    logp_old: torch.Tensor | None = None
    """[B] log-prob of x_next under the rollout policy (kl_only)."""
    task_advantage: torch.Tensor | None = None
    """[B] group-normalised task advantage of each sample's final image (mixed)."""
    group_size: int = 1
    """Rows per prompt group (consecutive rows share a prompt: rkl_pg normalises its rewards within them)."""


@dataclass
class LossOutput:
    """One chunk's loss, its per-sample main term and the logged terms."""
    loss: torch.Tensor
    """Scalar to backpropagate."""
    per_sample: torch.Tensor
    """[B] main term per row (detached): squared error or KL to the routed field."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors (converted to floats once per step by the trainer: no host sync per chunk)."""
    parts: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    """(pathwise, score): scalars whose gradients are the two parts of grad(loss), the anchor in the pathwise one
    (engine/opd/diagnostic.py); None = no such part."""


def _transition_mean(v: torch.Tensor, tr: Transition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = sde_step(tr.x, v, tr.sigma, tr.sigma_next, tr.sigma_1, tr.noise_level, prev_sample=tr.x_next)
    return out.mean.float(), out.std, out.log_prob


def transition_kl(v_a: torch.Tensor, v_b: torch.Tensor, tr: Transition) -> torch.Tensor:
    """[B] KL between the SDE transitions driven by two velocities at the same states."""
    mu_a, s, _ = _transition_mean(v_a, tr)
    mu_b, _, _ = _transition_mean(v_b, tr)
    sq = ((mu_a - mu_b) ** 2).mean(dim=tuple(range(1, mu_a.ndim)))
    return sq / (2 * s**2)


def _mse(v_a: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    return ((v_a.float() - v_b.float()) ** 2).mean(dim=tuple(range(1, v_a.ndim)))


@dataclass
class LossTerms:
    """What a loss function returns: its objective and distances, before the anchor is added."""

    loss: torch.Tensor
    """Scalar objective of the main term."""
    main: torch.Tensor
    """[B] distance of the student to the routed field (logged as `field`)."""
    anchor: torch.Tensor | None
    """[B] the same distance to the anchor field (None without an anchor)."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra detached scalars to log (ratio, clipfrac, ...)."""
    pathwise: torch.Tensor | None = None
    """A scalar whose gradient is the part of grad(loss) that flows through the distance directly (the
    pathwise part; for the gradient diagnostic). With `score` None the whole loss is pathwise and this is unused;
    with `score` set, None means the loss has no pathwise part."""
    score: torch.Tensor | None = None
    """A scalar whose gradient is the part of grad(loss) that flows through log p (the ratio); None = no score
    part."""


LossFn = Callable[[OPDConfig, torch.Tensor, torch.Tensor, Transition, "torch.Tensor | None"], LossTerms]
"""(cfg, v_student, v_target (detached), transition, v_anchor (detached) or None) -> LossTerms."""


def mse_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
             v_anchor: torch.Tensor | None) -> LossTerms:
    """DanceOPD: mean squared velocity error, no sigma weighting."""
    main = _mse(v_student, v_target)
    return LossTerms(main.mean(), main, _mse(v_student, v_anchor) if v_anchor is not None else None)


def gkd_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
             v_anchor: torch.Tensor | None) -> LossTerms:
    """Flow-OPD: the mean per-sample transition KL."""
    main = transition_kl(v_student, v_target, tr)
    return LossTerms(main.mean(), main, transition_kl(v_student, v_anchor, tr) if v_anchor is not None else None)


def _clipped(adv: torch.Tensor, ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's pessimistic objective max(-A r, -A clip(r, 1 +- clip)), elementwise (broadcasting A against r)."""
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))


def _ratio_terms(ratio: torch.Tensor, adv: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    r = ratio.detach()
    return {"ratio": r.mean(), "clipfrac": ((r - 1).abs() > clip).float().mean(), "advantage": adv.detach().mean()}


def kl_only_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
                 v_anchor: torch.Tensor | None) -> LossTerms:
    """Flow-OPD's shipped objective (`reward_mode = "kl_only"`, `kl_scale = -1`): the clipped ratio with
    advantage A = clamp(-kl, +-adv_clip), A attached to the graph.

    Flow-OPD scripts/train_sd3_opd_mix.py:1670-1686 (A = clamp(kl_scale kl, +-adv_clip_max), kl from the
    policy's live `prev_sample_mean`, not detached), :1754-1767 (ratio = exp(logp - logp_old), PPO clip
    `clip_range` = 1e-4, loss = mean(max(-A r, -A clip(r))) + beta kl_anchor). There A has shape [B, 1] and r
    [B] (:1671 squeezes only two of kl's three singleton dims), so the mean runs over all B x B pairs (A_i, r_j):
    `opd.advantage_pairs = true` reproduces that. Gradient at r = 1 (pairs): mean_i grad(kl_i), the pathwise
    term (= gkd's), plus mean_i(kl_i) mean_j grad(log p_j), the score term (per sample: kl_i grad(log p_i)). A
    sample with kl > adv_clip sits on the clamp (slope 0): it keeps only the score term, Flow-OPD's large-KL
    cut-off. `opd.advantage_grad = false` detaches A (DanceOPD's
    re-implementation, danceopd/core/flowopd.py:76-81, per sample): since kl depends on the state only,
    E[kl grad log p(x'|x)] = 0 and the term is zero-mean noise; only the anchor then pulls (toward the base).
    """
    return _kl_policy(cfg, v_student, v_target, tr, v_anchor, None)


def mixed_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
               v_anchor: torch.Tensor | None) -> LossTerms:
    """Flow-OPD's `reward_mode = "mixed"`: kl_only's clipped ratio with A = clamp(t - kl, +-adv_clip), where
    t = clamp(task advantage, +-adv_clip) is the sample's final-image advantage (sparse, the same at every state)
    and -kl the dense per-step reward (kl_scale = -1, as kl_only).

    Flow-OPD scripts/train_sd3.py:1122-1170 (`task_advantage = sample["advantages"][:, last]`, clamped, then
    `advantages = task_advantage + kl_scale * kl_reward`, clamped again; kl_norm "none"). There kl_reward is
    [B, 1] and task_advantage [B], so A is the B x B matrix A[i, j] = t_j - kl_i against ratio r_j:
    `opd.advantage_pairs = true` reproduces that, false is the per-sample A_i = t_i - kl_i. With t = 0 this is
    kl_only exactly (tested)."""
    if tr.task_advantage is None:
        raise ValueError("opd.loss = 'mixed' needs the task advantages of the rollouts (rl.rewards)")
    return _kl_policy(cfg, v_student, v_target, tr, v_anchor, tr.task_advantage)


def _kl_policy(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
               v_anchor: torch.Tensor | None, task: torch.Tensor | None) -> LossTerms:
    """kl_only (task None) and mixed: the clipped ratio with A = clamp([clamp(task)] - kl), A attached."""
    main = transition_kl(v_student, v_target, tr)
    anchor = transition_kl(v_student, v_anchor, tr) if v_anchor is not None else None
    if tr.logp_old is None:
        raise ValueError(f"{cfg.loss} needs the rollout's log-probs")
    _, _, logp = _transition_mean(v_student, tr)
    ratio = torch.exp(logp - tr.logp_old)
    t = torch.zeros_like(main) if task is None else torch.clamp(task.to(main.dtype), -cfg.adv_clip, cfg.adv_clip)
    kl = main if cfg.advantage_grad else main.detach()
    # pairs: A[i, j] = t_j - kl_i against ratio r_j, the B x B broadcast of Flow-OPD's [B, 1] kl and [B] ratio
    adv = torch.clamp(t[None, :] - kl[:, None] if cfg.advantage_pairs else t - kl, -cfg.adv_clip, cfg.adv_clip)
    loss = _clipped(adv, ratio, cfg.clip_range).mean()
    pathwise = _clipped(adv, ratio.detach(), cfg.clip_range).mean() if cfg.advantage_grad else None
    score = _clipped(adv.detach(), ratio, cfg.clip_range).mean()
    return LossTerms(loss, main, anchor, _ratio_terms(ratio, adv, cfg.clip_range), pathwise, score)


def group_normalise(r: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per consecutive group of `group_size` rows (population std), Flow-GRPO's
    per-prompt advantage with per-prompt std (flow_grpo/stat_tracking.py:25-31; its `global_std` option, which
    Flow-OPD sets, divides by the std of the whole batch instead)."""
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rows do not split into prompt groups of {group_size}")
    g = r.reshape(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


def rkl_pg_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
                v_anchor: torch.Tensor | None) -> LossTerms:
    """Reverse-KL policy gradient on the student's own sampled transitions (this engine's; no paper has it).

    Per query state x with the rollout's sample x' ~ p_theta(.|x), the reward is R = log p_T(x'|x) -
    log p_theta(x'|x): its mean over x' is -KL(p_theta || p_T), the reverse KL. With f = log p_T - log p_theta,
    grad E_{x'~p_theta}[f] = E[f grad log p_theta] + E[grad f], and E[grad f] = -E[grad log p_theta] = 0 (the
    score identity), so grad(-KL) = E[R grad log p_theta(x'|x)]: REINFORCE with a reward that depends on the
    sampled action (kl_only's advantage depends on the state only, so its score term has mean 0). For Flow-GRPO's
    Gaussian step (both policies with std sigma = s sqrt(-dt), log-probs averaged over the D = CHW elements) and
    x' = mu_theta + sigma eps, Delta = mu_theta - mu_T: R = -mean(Delta^2)/(2 sigma^2) - mean(Delta eps)/sigma and
    E[R grad log p_theta] = -(1/D) grad mean(Delta^2)/(2 sigma^2): in expectation the pathwise gradient of the
    transition KL, estimated from the sampled noise instead of computed in closed form.

    R is normalised per prompt group (the `rollout.group_size` consecutive rows of a prompt, `group_normalise`),
    clamped to +-adv_clip, and enters PPO's clipped ratio (clip_range) as Flow-GRPO's advantage does;
    `opd.rkl_pathwise` adds w x the mean transition KL (gkd's pathwise term). The logged `field` is the KL.
    """
    main = transition_kl(v_student, v_target, tr)
    anchor = transition_kl(v_student, v_anchor, tr) if v_anchor is not None else None
    if tr.logp_old is None:
        raise ValueError("rkl_pg needs the rollout's log-probs")
    _, _, logp = _transition_mean(v_student, tr)
    with torch.no_grad():
        _, _, logp_target = _transition_mean(v_target, tr)
        reward = logp_target - logp
        adv = torch.clamp(group_normalise(reward, tr.group_size), -cfg.adv_clip, cfg.adv_clip)
    ratio = torch.exp(logp - tr.logp_old)
    score = _clipped(adv, ratio, cfg.clip_range).mean()
    pathwise = cfg.rkl_pathwise * main.mean() if cfg.rkl_pathwise > 0 else None
    loss = score if pathwise is None else score + pathwise
    terms = {**_ratio_terms(ratio, adv, cfg.clip_range), "reward": reward.mean()}
    return LossTerms(loss, main, anchor, terms, pathwise, score)


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "gkd": gkd_loss, "kl_only": kl_only_loss, "rkl_pg": rkl_pg_loss,
                             "mixed": mixed_loss}


def register_loss(name: str, fn: LossFn) -> None:
    """Make `fn` selectable as `opd.loss = name` (a new loss = one function + this one line)."""
    LOSSES[name] = fn


def loss_names() -> list[str]:
    """Every selectable `opd.loss`."""
    return list(LOSSES)


def opd_loss(
    cfg: OPDConfig,
    v_student: torch.Tensor,
    v_target: torch.Tensor,
    tr: Transition,
    v_anchor: torch.Tensor | None = None,
) -> LossOutput:
    """The configured loss (`cfg.loss`) of one chunk: the main term against the routed field's velocity
    `v_target`, plus beta x the same term against `v_anchor` when given."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; valid: {', '.join(LOSSES)}")
    out = LOSSES[cfg.loss](cfg, v_student, v_target.detach(), tr, None if v_anchor is None else v_anchor.detach())
    loss, terms = out.loss, dict(out.terms)
    terms["field"] = out.main.detach().mean()
    pathwise = out.loss if out.score is None else out.pathwise
    if out.anchor is not None:
        anchor = cfg.beta * out.anchor.mean()
        loss = loss + anchor
        pathwise = anchor if pathwise is None else pathwise + anchor
        terms["anchor"] = out.anchor.detach().mean()
    terms["loss"] = loss.detach()
    return LossOutput(loss=loss, per_sample=out.main.detach(), terms=terms, parts=(pathwise, out.score))
