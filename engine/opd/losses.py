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

from dataclasses import dataclass, field

import torch

from engine.config import OPDConfig
from engine.sampling.steps import sde_step


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


def opd_loss(
    cfg: OPDConfig,
    v_student: torch.Tensor,
    v_target: torch.Tensor,
    tr: Transition,
    v_anchor: torch.Tensor | None = None,
) -> LossOutput:
    v_target = v_target.detach()
    terms: dict[str, torch.Tensor] = {}
    if cfg.loss == "mse":
        main = _mse(v_student, v_target)
        loss = main.mean()
        anchor = _mse(v_student, v_anchor.detach()) if v_anchor is not None else None
    elif cfg.loss in ("gkd", "kl_only"):
        main = transition_kl(v_student, v_target, tr)
        anchor = transition_kl(v_student, v_anchor.detach(), tr) if v_anchor is not None else None
        if cfg.loss == "gkd":
            loss = main.mean()
        else:
            if tr.logp_old is None:
                raise ValueError("kl_only needs the rollout's log-probs")
            _, _, logp = _transition_mean(v_student, tr)
            ratio = torch.exp(logp - tr.logp_old)
            adv = torch.clamp(-main.detach(), -cfg.adv_clip, cfg.adv_clip)
            unclipped = -adv * ratio
            clipped = -adv * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
            loss = torch.maximum(unclipped, clipped).mean()
            terms["ratio"] = ratio.detach().mean()
            terms["clipfrac"] = ((ratio.detach() - 1).abs() > cfg.clip_range).float().mean()
            terms["advantage"] = adv.mean()
    else:
        raise ValueError(f"unknown loss {cfg.loss!r}")
    terms["field"] = main.detach().mean()
    if anchor is not None:
        loss = loss + cfg.beta * anchor.mean()
        terms["anchor"] = anchor.detach().mean()
    terms["loss"] = loss.detach()
    return LossOutput(loss=loss, per_sample=main.detach(), terms=terms)
