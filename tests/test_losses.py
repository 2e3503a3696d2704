"""OPD losses against hand-written float64 formulas (DESIGN §1)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import OPDConfig
from engine.opd.losses import Transition, opd_loss, transition_kl
from engine.ops import sde_step_ref
from engine.sampling.schedule import flow_match_sigmas


def make_transition(b: int = 4, shape=(3, 5, 6), idx=None, dtype=torch.float64) -> Transition:
    sig = flow_match_sigmas(10, 3.0).double()
    idx = torch.tensor(idx if idx is not None else [0, 3, 5, 8][:b])
    x = torch.randn(b, *shape, dtype=dtype)
    v_old = torch.randn_like(x)
    out = sde_step_ref(x, v_old, sig[idx], sig[idx + 1], float(sig[1]), 0.7, compute_dtype=torch.float64)
    return Transition(x=x, x_next=out.sample, sigma=sig[idx], sigma_next=sig[idx + 1], sigma_1=float(sig[1]),
                      noise_level=0.7, logp_old=out.log_prob.double())


def kl_f64(v_a, v_b, tr: Transition) -> torch.Tensor:
    rows = []
    for i in range(v_a.shape[0]):
        s_, sn = float(tr.sigma[i]), float(tr.sigma_next[i])
        tilde = tr.sigma_1 if s_ == 1.0 else s_
        s = 0.7 * math.sqrt(s_ / (1 - tilde))
        dt = sn - s_
        factor = (1 + s**2 * (1 - s_) / (2 * s_)) * dt
        rows.append(((factor * (v_a[i] - v_b[i]).double()) ** 2).mean() / (2 * s**2))
    return torch.stack(rows)


def test_transition_kl_formula_including_sigma_one() -> None:
    tr = make_transition()
    va, vb = torch.randn_like(tr.x), torch.randn_like(tr.x)
    torch.testing.assert_close(transition_kl(va, vb, tr).double(), kl_f64(va, vb, tr), rtol=1e-5, atol=1e-9)


def test_mse_loss_and_anchor() -> None:
    tr = make_transition()
    vs = torch.randn_like(tr.x, requires_grad=True)
    vt, va = torch.randn_like(tr.x), torch.randn_like(tr.x)
    cfg = OPDConfig(loss="mse", beta=0.5)
    out = opd_loss(cfg, vs, vt, tr, va)
    expected = ((vs - vt) ** 2).mean() + 0.5 * ((vs - va) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), expected.double(), rtol=1e-6, atol=1e-9)
    out.loss.backward()
    grad = (2 * (vs - vt) + 0.5 * 2 * (vs - va)).detach() / vs.numel()
    torch.testing.assert_close(vs.grad, grad, rtol=1e-6, atol=1e-9)


def test_gkd_loss_is_mean_kl_plus_beta_anchor() -> None:
    tr = make_transition()
    vs, vt, va = (torch.randn_like(tr.x) for _ in range(3))
    out = opd_loss(OPDConfig(loss="gkd", beta=0.04), vs, vt, tr, va)
    expected = kl_f64(vs, vt, tr).mean() + 0.04 * kl_f64(vs, va, tr).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-9)
    assert set(out.terms) >= {"loss", "field", "anchor"}
    assert out.per_sample.shape == (4,)


def test_gkd_zero_when_student_equals_field() -> None:
    tr = make_transition()
    v = torch.randn_like(tr.x)
    assert opd_loss(OPDConfig(loss="gkd"), v, v.clone(), tr).loss.item() == 0.0


def test_kl_only_detached_gradient_is_advantage_weighted_logprob() -> None:
    """The detached ablation, per sample: at ratio 1 (logp_old from the same velocity) the clipped objective's
    gradient is -A grad logp / B."""
    sig = flow_match_sigmas(10, 3.0).double()
    idx = torch.tensor([1, 4, 6])
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    old = sde_step_ref(x, v, sig[idx], sig[idx + 1], float(sig[1]), 0.7, compute_dtype=torch.float64)
    tr = Transition(x=x, x_next=old.sample, sigma=sig[idx], sigma_next=sig[idx + 1], sigma_1=float(sig[1]),
                    noise_level=0.7, logp_old=old.log_prob.double())
    vt = torch.randn_like(x)
    vs = v.clone().requires_grad_(True)
    cfg = OPDConfig(loss="kl_only", beta=0.0, adv_clip=5.0, clip_range=1e-4, advantage_grad=False,
                    advantage_pairs=False)
    out = opd_loss(cfg, vs, vt, tr)
    out.loss.backward()
    adv = torch.clamp(-kl_f64(v, vt, tr), -5, 5)
    vr = v.clone().requires_grad_(True)
    lp = sde_step_ref(x, vr, sig[idx], sig[idx + 1], float(sig[1]), 0.7, prev_sample=old.sample,
                      compute_dtype=torch.float64).log_prob
    (-(adv * lp).mean()).backward()
    torch.testing.assert_close(vs.grad, vr.grad, rtol=1e-4, atol=1e-10)
    assert out.terms["ratio"].item() == pytest.approx(1.0, abs=1e-6)


def test_kl_only_clips_large_ratios() -> None:
    tr = make_transition(b=3, idx=[2, 4, 6])
    vs = torch.randn_like(tr.x, requires_grad=True)  # far from the rollout's velocity: ratios far from 1
    out = opd_loss(OPDConfig(loss="kl_only", beta=0.0), vs, torch.randn_like(tr.x), tr)
    assert out.terms["clipfrac"].item() == 1.0


def test_kl_only_requires_logp() -> None:
    tr = make_transition()
    tr.logp_old = None
    with pytest.raises(ValueError, match="log-probs"):
        opd_loss(OPDConfig(loss="kl_only"), tr.x, tr.x, tr)
