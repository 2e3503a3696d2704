"""Flow-GRPO's policy loss on one training state of every sample (scripts/train_sd3.py lines 870-897 at
yifan123/flow_grpo@ac4c86e):

    A      = clamp(advantage, -adv_clip, adv_clip)
    ratio  = exp(log p_theta(x'|x) - log p_old(x'|x))            (the rollout's log-prob of the stored transition)
    policy = mean_i max(-A_i ratio_i, -A_i clamp(ratio_i, 1 - eps, 1 + eps))       eps = clip_range (1e-4)
    kl     = mean_i mean_CHW (mu_theta - mu_ref)^2 / (2 s^2)      (s = a sqrt(sigma / (1 - sigma)), not s sqrt(-dt))
    loss   = policy + beta kl

The mean runs over the kept samples only (Flow-GRPO removes zero-advantage samples before training, lines
796-817): `normalizer` is their count, over every rank divided by the world size when the micro-batch is split
over ranks (DeepSpeed averages the ranks' gradients), so 1 rank x 2P prompts equals 2 ranks x P even when one
rank's groups are all filtered; a chunk whose samples are all filtered still back-propagates a zero loss, so
DeepSpeed's micro-step count per optimizer step stays fixed. Logged as flow_grpo logs: approx_kl = 0.5 mean
(log ratio)^2, clipfrac (and > 1, < 1), policy_loss, kl_loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GRPOTerms:
    """One chunk's GRPO loss and its logged terms (detached scalars)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, keep: torch.Tensor, *,
              clip_range: float, adv_clip: float, kl: torch.Tensor | None = None, beta: float = 0.0,
              normalizer: float | None = None) -> GRPOTerms:
    """The clipped policy loss (+ beta kl) of one chunk: logp [B] with grad, logp_old / advantages / keep [B];
    `normalizer` = the kept samples the mean runs over (default: this chunk's own kept count)."""
    adv = torch.clamp(advantages.to(logp.dtype), -adv_clip, adv_clip)
    log_ratio = logp - logp_old.to(logp.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    w = keep.to(logp.dtype)
    n = w.sum().clamp_min(1.0) if normalizer is None else torch.as_tensor(max(normalizer, 1e-12), dtype=logp.dtype)
    policy = (torch.maximum(unclipped, clipped) * w).sum() / n
    loss = policy
    r = ratio.detach()
    terms = {
        "policy_loss": policy.detach(),
        "approx_kl": 0.5 * ((log_ratio.detach() ** 2) * w).sum() / n,
        "clipfrac": (((r - 1.0).abs() > clip_range).to(w.dtype) * w).sum() / n,
        "clipfrac_gt_one": (((r - 1.0) > clip_range).to(w.dtype) * w).sum() / n,
        "clipfrac_lt_one": (((1.0 - r) > clip_range).to(w.dtype) * w).sum() / n,
        "kept": w.mean(),
    }
    if kl is not None and beta > 0:
        kl_mean = (kl * w).sum() / n
        loss = loss + beta * kl_mean
        terms["kl_loss"] = kl_mean.detach()
    terms["loss"] = loss.detach()
    return GRPOTerms(loss, terms)
