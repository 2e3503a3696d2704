"""OPD losses (DESIGN §1). One call scores one chunk of query states (B rows, one state each).

- `mse` (DanceOPD): mean ||v_theta - v_F||^2 over all elements, no sigma weighting; anchor term the same.
- `gkd` (Flow-OPD): per-sample transition KL kl = mean_CHW (mu_theta - mu_F)^2 / (2 s^2), loss = mean(kl)
  + beta mean(kl_anchor). Both means come from the same SDE step at the same state, so
  mu_theta - mu_F = (1 + s^2 (1 - sigma) / (2 sigma)) dt (v_theta - v_F).
- `kl_only` (Flow-OPD): PPO-style clipped objective on the student's own log-probs with advantage
  A = clamp(-kl, +-adv_clip) (detached) and ratio exp(logp_theta - logp_old) clipped to 1 +- clip_range,
  plus beta mean(kl_anchor).
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


@dataclass
class LossOutput:
    """One chunk's loss, its per-sample main term and the logged terms."""
    loss: torch.Tensor
    """Scalar to backpropagate."""
    per_sample: torch.Tensor
    """[B] main term per row (detached): squared error or KL to the routed field."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors (converted to floats once per step by the trainer: no host sync per chunk)."""


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


def kl_only_loss(cfg: OPDConfig, v_student: torch.Tensor, v_target: torch.Tensor, tr: Transition,
                 v_anchor: torch.Tensor | None) -> LossTerms:
    """Flow-OPD's clipped-ratio objective with advantage A = clamp(-kl, +-adv_clip)."""
    main = transition_kl(v_student, v_target, tr)
    anchor = transition_kl(v_student, v_anchor, tr) if v_anchor is not None else None
    if tr.logp_old is None:
        raise ValueError("kl_only needs the rollout's log-probs")
    _, _, logp = _transition_mean(v_student, tr)
    ratio = torch.exp(logp - tr.logp_old)
    adv = torch.clamp(-main.detach(), -cfg.adv_clip, cfg.adv_clip)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
    terms = {"ratio": ratio.detach().mean(),
             "clipfrac": ((ratio.detach() - 1).abs() > cfg.clip_range).float().mean(),
             "advantage": adv.mean()}
    return LossTerms(torch.maximum(unclipped, clipped).mean(), main, anchor, terms)


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "gkd": gkd_loss, "kl_only": kl_only_loss}


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
    if out.anchor is not None:
        loss = loss + cfg.beta * out.anchor.mean()
        terms["anchor"] = out.anchor.detach().mean()
    terms["loss"] = loss.detach()
    return LossOutput(loss=loss, per_sample=out.main.detach(), terms=terms)
