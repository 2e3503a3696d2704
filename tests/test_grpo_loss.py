"""Flow-GRPO's clipped policy loss (engine/rl/grpo.py) against a float64 transcription of flow_grpo's training
step (scripts/train_sd3.py:881-897), its gradient, and the zero-advantage filter."""

from __future__ import annotations

import torch

from engine.rl.grpo import grpo_loss


def _flow_grpo(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, clip: float, adv_max: float,
               kl: torch.Tensor, beta: float) -> torch.Tensor:
    a = torch.clamp(adv, -adv_max, adv_max)
    ratio = torch.exp(logp - old)
    policy = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)))
    return policy + beta * torch.mean(kl)


def test_matches_flow_grpo_in_float64_with_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    old = torch.randn(7, generator=g, dtype=torch.float64)
    logp = (old + 1e-4 * torch.randn(7, generator=g, dtype=torch.float64)).requires_grad_()
    adv = 4 * torch.randn(7, generator=g, dtype=torch.float64)  # some beyond the clamp at 5
    kl = torch.rand(7, generator=g, dtype=torch.float64, requires_grad=True)
    want = _flow_grpo(logp, old, adv, 1e-4, 5.0, kl, 0.04)
    gw = torch.autograd.grad(want, [logp, kl])
    out = grpo_loss(logp, old, adv, torch.ones(7, dtype=torch.bool), clip_range=1e-4, adv_clip=5.0, kl=kl, beta=0.04)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-15)
    for a, b in zip(torch.autograd.grad(out.loss, [logp, kl]), gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert 0 <= float(out.terms["clipfrac"]) <= 1 and float(out.terms["kept"]) == 1.0


def test_filtered_samples_give_no_gradient_and_the_mean_runs_over_the_kept() -> None:
    logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    keep = adv != 0
    out = grpo_loss(logp, torch.zeros(4, dtype=torch.float64), adv, keep, clip_range=1e-4, adv_clip=5.0)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad.tolist() == [-0.5, 0.5, 0.0, 0.0]  # d/dlogp of -A ratio / 2 kept samples at ratio 1
    none = grpo_loss(logp, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                     torch.zeros(4, dtype=torch.bool), clip_range=1e-4, adv_clip=5.0)
    (grad,) = torch.autograd.grad(none.loss, logp)
    assert float(none.loss) == 0.0 and torch.equal(grad, torch.zeros(4, dtype=torch.float64))
