"""The OPD losses against the papers' code and independent float64 formulas (issue 14).

- kl_only: Flow-OPD's scripts/train_sd3_opd_mix.py:1670-1686 + 1754-1767 transcribed in float64 (with its own SDE
  step, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:50-68): the same loss and the same gradient, including
  the [B, 1] x [B] broadcast, the attached advantage and the large-KL cut-off of the clamp.
- the detached ablation has zero-mean gradient, the attached form the transition KL's (Monte Carlo).
- rkl_pg: its reward is log N(x'; mu_T) - log N(x'; mu_theta), group-normalised; E[R grad log p] is minus the
  KL's gradient / D (the docstring's derivation), checked by Monte Carlo.
- the gradient diagnostic's two parts add up to the loss's gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import OPDConfig
from engine.opd.diagnostic import gradient_parts
from engine.opd.losses import Transition, group_normalise, opd_loss
from engine.ops import sde_step_ref
from engine.sampling.schedule import flow_match_sigmas

SIG = flow_match_sigmas(10, 3.0).double()


def flow_grpo_step(v, x, sigma, sigma_next, sigma_max, prev_sample, noise_level=0.7):
    """sd3_sde_with_logprob.py:42-68 in float64: (log_prob [B], prev_sample_mean, std_dev_t [B,1,1,1])."""
    sigma = sigma.view(-1, 1, 1, 1)
    sigma_prev = sigma_next.view(-1, 1, 1, 1)
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_dev_t


def flow_opd_kl_only(v_s, v_t, v_a, x, x_next, idx, logp_old, beta, clip_range=1e-4, adv_clip_max=5.0,
                     kl_scale=-1.0):
    """train_sd3_opd_mix.py:1670-1686 (kl_reward, advantages) and :1754-1767 (ratio, clipped loss, MAR kl)."""
    log_prob, prev_sample_mean, std_dev_t = flow_grpo_step(v_s, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    _, prev_sample_mean_ref_lora, _ = flow_grpo_step(v_t, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    _, prev_sample_mean_ref_base, _ = flow_grpo_step(v_a, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    kl_reward = ((prev_sample_mean - prev_sample_mean_ref_lora) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
        2 * std_dev_t**2)
    kl_reward = kl_reward.squeeze(-1).squeeze(-1)
    advantages = torch.clamp(kl_scale * kl_reward, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - logp_old)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref_base) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
        2 * std_dev_t**2)
    return policy_loss + beta * torch.mean(kl_loss)


def states(b: int, shape=(2, 4, 4), seed: int = 0, idx=None):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor(idx if idx is not None else [(3 * i) % 9 for i in range(b)])
    x = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    v_old = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    old = sde_step_ref(x, v_old, SIG[idx], SIG[idx + 1], float(SIG[1]), 0.7, compute_dtype=torch.float64)
    return idx, x, v_old, old


def transition(idx, x, x_next, logp_old, group_size: int = 1) -> Transition:
    return Transition(x=x, x_next=x_next, sigma=SIG[idx], sigma_next=SIG[idx + 1], sigma_1=float(SIG[1]),
                      noise_level=0.7, logp_old=logp_old, group_size=group_size)


@pytest.mark.parametrize("clip_range", [1e-4, 0.03])
def test_kl_only_is_flow_opds_code_loss_and_gradient(clip_range: float) -> None:
    """Ratios partly inside, partly outside the clip (logp_old of a nearby velocity), anchor on."""
    idx, x, v_old, old = states(5)
    gen = torch.Generator().manual_seed(3)
    v_t, v_a = (v_old + 0.3 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    v0 = v_old + 0.02 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64)
    ours, ref = v0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    cfg = OPDConfig(loss="kl_only", beta=0.04, clip_range=clip_range)
    out = opd_loss(cfg, ours, v_t, transition(idx, x, old.sample, old.log_prob.double()), v_a)
    expected = flow_opd_kl_only(ref, v_t, v_a, x, old.sample, idx, old.log_prob.double(), 0.04, clip_range)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-9)
    out.loss.backward()
    expected.backward()
    # float32 log-probs in ours (the op's compute dtype): agreement to ~1e-4 relative
    torch.testing.assert_close(ours.grad, ref.grad, rtol=2e-3, atol=1e-6)
    if clip_range == 1e-4:
        assert out.terms["clipfrac"].item() > 0  # the test exercises the clipped branch too


def test_kl_only_large_kl_keeps_only_the_score_term() -> None:
    """A sample with kl > adv_clip sits on the clamp: its pathwise gradient is exactly 0 (Flow-OPD's cut-off)."""
    idx, x, v_old, old = states(3, idx=[8, 4, 6])
    v_t = v_old + 0.5
    v_t[0] += 40.0  # kl of row 0 (sigma 0.278, s^2 = 0.19): ~480 >> 5
    cfg = OPDConfig(loss="kl_only", beta=0.0, advantage_pairs=False)
    tr = transition(idx, x, old.sample, old.log_prob.double())
    v = v_old.clone().requires_grad_(True)
    out = opd_loss(cfg, v, v_t, tr)
    assert out.per_sample[0] > 5 and out.per_sample[1:].max() < 5
    pathwise, score = out.parts
    g_path = torch.autograd.grad(pathwise, v, retain_graph=True)[0]
    g_score = torch.autograd.grad(score, v, retain_graph=True)[0]
    assert g_path[0].abs().max() == 0 and g_path[1:].abs().max() > 0
    lp = sde_step_ref(x, v, SIG[idx], SIG[idx + 1], float(SIG[1]), 0.7, prev_sample=old.sample,
                      compute_dtype=torch.float64).log_prob
    # at ratio 1 the score term of row 0 is -A_0 grad(r_0) / B = 5 grad(log p_0) / 3
    g_expected = torch.autograd.grad(5.0 * lp[0] / 3, v)[0]
    torch.testing.assert_close(g_score[0], g_expected[0], rtol=1e-4, atol=1e-8)


def _mc_gradients(n: int, cfg: OPDConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of the loss, grad of the mean transition KL) wrt a shared velocity, over n sampled x' at one state."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 2, 2)
    x = torch.randn(1, *shape, generator=gen, dtype=torch.float64).expand(n, *shape)
    theta = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
    v_t = (theta + 0.5 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)).expand(n, *shape)
    idx = torch.full((n,), 4)
    old = sde_step_ref(x, theta.expand(n, *shape), SIG[idx], SIG[idx + 1], float(SIG[1]), 0.7,
                       noise=torch.randn(n, *shape, generator=gen, dtype=torch.float64), compute_dtype=torch.float64)
    tr = transition(idx, x, old.sample, old.log_prob.double(), group_size=n)
    v = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(opd_loss(cfg, v.expand(n, *shape), v_t, tr).loss, v)[0]
    v2 = theta.clone().requires_grad_(True)
    g_kl = torch.autograd.grad(opd_loss(OPDConfig(loss="gkd", beta=0.0), v2.expand(n, *shape), v_t, tr).loss, v2)[0]
    return g, g_kl


def test_detached_kl_only_has_zero_mean_gradient_and_the_reference_trains_toward_the_teacher() -> None:
    n = 200_000
    g_det, g_kl = _mc_gradients(n, OPDConfig(loss="kl_only", beta=0.0, advantage_grad=False, advantage_pairs=False))
    g_ref, _ = _mc_gradients(n, OPDConfig(loss="kl_only", beta=0.0, advantage_pairs=False))
    assert g_det.norm() < 0.02 * g_kl.norm()  # E[kl grad log p] = 0: only sampling noise is left
    torch.testing.assert_close(g_ref, g_kl, rtol=0.02, atol=0.02 * float(g_kl.norm()))


def test_rkl_pg_reward_and_gradient_at_ratio_one() -> None:
    idx, x, v_old, old = states(6, idx=[1, 1, 5, 5, 7, 7])
    gen = torch.Generator().manual_seed(5)
    v_t = v_old + 0.4 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64)
    tr = transition(idx, x, old.sample, old.log_prob.double(), group_size=2)
    v = v_old.clone().requires_grad_(True)
    out = opd_loss(OPDConfig(loss="rkl_pg", beta=0.0, adv_clip=5.0), v, v_t, tr)
    lp_t, _, _ = flow_grpo_step(v_t, x, SIG[idx], SIG[idx + 1], SIG[1], old.sample)
    lp_s, _, _ = flow_grpo_step(v_old, x, SIG[idx], SIG[idx + 1], SIG[1], old.sample)
    reward = (lp_t - lp_s).numpy().reshape(3, 2)
    adv = ((reward - reward.mean(1, keepdims=True)) / (reward.std(1, keepdims=True) + 1e-4)).reshape(-1)
    assert out.terms["reward"].item() == pytest.approx(float(reward.mean()), rel=1e-4)
    out.loss.backward()
    vr = v_old.clone().requires_grad_(True)
    lp = sde_step_ref(x, vr, SIG[idx], SIG[idx + 1], float(SIG[1]), 0.7, prev_sample=old.sample,
                      compute_dtype=torch.float64).log_prob
    (-(torch.as_tensor(np.clip(adv, -5, 5)) * lp).mean()).backward()
    torch.testing.assert_close(v.grad, vr.grad, rtol=1e-3, atol=1e-8)


def test_group_normalise_matches_numpy() -> None:
    r = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 3.0])
    g = r.numpy().reshape(2, 3)
    expected = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(group_normalise(r, 3).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="prompt groups of 4"):
        group_normalise(r, 4)


def test_rkl_pg_expected_gradient_is_minus_the_kl_gradient_over_d() -> None:
    """E[R grad log p] = -(1/D) grad mean(Delta^2) / (2 sigma^2) with sigma = s sqrt(-dt) (the docstring): the raw
    score-function estimate (no normalisation) against the closed form, by Monte Carlo."""
    gen = torch.Generator().manual_seed(11)
    n, shape = 400_000, (1, 2, 2)
    d = 4
    idx = torch.full((n,), 3)
    x = torch.randn(1, *shape, generator=gen, dtype=torch.float64).expand(n, *shape)
    theta = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
    v_t = theta + 0.3 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    step = dict(sigma=SIG[idx], sigma_next=SIG[idx + 1], sigma_1=float(SIG[1]), noise_level=0.7,
                compute_dtype=torch.float64)
    sample = sde_step_ref(x, theta.expand(n, *shape), noise=noise, **step).sample
    v = theta.clone().requires_grad_(True)
    lp = sde_step_ref(x, v.expand(n, *shape), prev_sample=sample, **step).log_prob
    with torch.no_grad():
        lp_t = sde_step_ref(x, v_t.expand(n, *shape), prev_sample=sample, **step).log_prob
        reward = lp_t - lp
    g_pg = torch.autograd.grad((reward * lp).mean(), v)[0]
    v2 = theta.clone().requires_grad_(True)
    s_, sn = float(SIG[3]), float(SIG[4])
    sigma = 0.7 * math.sqrt(s_ / (1 - s_)) * math.sqrt(s_ - sn)
    mu = lambda vel: sde_step_ref(x[:1], vel, **{**step, "sigma": SIG[3:4], "sigma_next": SIG[4:5]}).mean  # noqa: E731
    kl = ((mu(v2) - mu(v_t)) ** 2).mean() / (2 * sigma**2)
    g_kl = torch.autograd.grad(kl, v2)[0]
    torch.testing.assert_close(g_pg, -g_kl / d, rtol=0.05, atol=0.05 * float(g_kl.norm()) / d)


@pytest.mark.parametrize("loss", ["gkd", "mse", "kl_only", "rkl_pg"])
def test_gradient_diagnostic_parts_add_up_to_the_gradient(loss: str) -> None:
    idx, x, v_old, old = states(4, idx=[0, 0, 6, 6])
    gen = torch.Generator().manual_seed(2)
    v_t, v_a = (v_old + 0.3 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    theta = torch.nn.Parameter(v_old + 0.01 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64))
    cfg = OPDConfig(loss=loss, beta=0.04, rkl_pathwise=0.5)
    out = opd_loss(cfg, theta * 1.0, v_t, transition(idx, x, old.sample, old.log_prob.double(), 2), v_a)
    parts = gradient_parts(*out.parts, [theta])
    (g,) = torch.autograd.grad(out.loss, [theta], retain_graph=True)
    gp = torch.autograd.grad(out.parts[0], [theta], retain_graph=True)[0]
    gs = torch.autograd.grad(out.parts[1], [theta])[0] if out.parts[1] is not None else torch.zeros_like(g)
    torch.testing.assert_close(gp + gs, g, rtol=1e-6, atol=1e-12)
    assert parts["grad/pathwise"].item() == pytest.approx(float(gp.norm()), rel=1e-5)
    assert parts["grad/score"].item() == pytest.approx(float(gs.norm()), rel=1e-5, abs=1e-12)
    if loss in ("gkd", "mse"):
        assert parts["grad/score"].item() == 0 and parts["grad/cos"].item() == 0
    else:
        cos = float((gp.flatten() @ gs.flatten()) / (gp.norm() * gs.norm()))
        assert parts["grad/cos"].item() == pytest.approx(cos, rel=1e-4, abs=1e-6)
