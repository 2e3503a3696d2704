"""SDE/ODE steps against the DESIGN §1 formulas written out independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from engine.ops import cfg_combine, ode_step, sde_noise_std, sde_step, sde_step_ref
from engine.sampling.schedule import flow_match_sigmas


def formulas_f64(x, v, sigma, sigma_next, sigma_1, a, eps):
    """Per-sample float64 evaluation, scalar sigma loop (deliberately not vectorised like the code)."""
    x, v, eps = x.double(), v.double(), eps.double()
    outs = []
    for i in range(x.shape[0]):
        s_, sn = float(sigma[i]), float(sigma_next[i])
        tilde = sigma_1 if s_ == 1.0 else s_
        s = a * math.sqrt(s_ / (1 - tilde))
        dt = sn - s_
        mu = x[i] + (v[i] + s**2 / (2 * s_) * (x[i] + (1 - s_) * v[i])) * dt
        std = s * math.sqrt(-dt)
        xn = mu + std * eps[i]
        lp = (-((xn - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
        outs.append((xn, mu, lp, s))
    xn, mu, lp, s = zip(*outs)
    return torch.stack(xn), torch.stack(mu), torch.stack(lp), torch.tensor(s, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 16, 9, 11), (5, 3, 2, 2)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_sde_step_matches_formulas(shape, dtype, atol) -> None:
    sig = flow_match_sigmas(10, 3.0)
    b = shape[0]
    idx = torch.randint(0, 10, (b,))
    idx[0] = 0  # always cover the sigma = 1 edge
    sigma, sigma_next = sig[idx], sig[idx + 1]
    x = torch.randn(shape).to(dtype)
    v = torch.randn(shape).to(dtype)
    eps = torch.randn(shape)
    out = sde_step(x, v, sigma, sigma_next, float(sig[1]), 0.7, noise=eps)
    xn, mu, lp, s = formulas_f64(x, v, sigma.double(), sigma_next.double(), float(sig[1]), 0.7, eps)
    assert out.sample.dtype == dtype and out.mean.dtype == dtype and out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.mean.double(), mu, atol=atol, rtol=atol)
    torch.testing.assert_close(out.sample.double(), xn, atol=atol, rtol=atol)
    torch.testing.assert_close(out.std.double(), s, atol=1e-6, rtol=1e-6)
    # log-prob of the sample it just drew: -|eps|^2/2 - log std - log(2pi)/2, exact up to rounding of x'
    torch.testing.assert_close(out.log_prob.double(), lp, atol=atol * 10, rtol=1e-3)


def test_sigma_one_edge_uses_second_sigma_in_denominator_only() -> None:
    sig = flow_match_sigmas(10, 3.0)
    s = sde_noise_std(torch.tensor([1.0, 0.5]), sig[1], 0.7)
    assert s[0].item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - sig[1].item())), rel=1e-6)
    assert s[1].item() == pytest.approx(0.7 * math.sqrt(0.5 / 0.5), rel=1e-6)


def test_mean_difference_identity() -> None:
    """mu_a - mu_b = (1 + s^2 (1-sigma)/(2 sigma)) dt (v_a - v_b); = (1 + a^2/2) dt dv for sigma < 1."""
    sig = flow_match_sigmas(10, 3.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    va, vb = torch.randn_like(x), torch.randn_like(x)
    for i in (0, 4):
        sigma, nxt = sig[i].double().expand(2), sig[i + 1].double().expand(2)
        ma = sde_step_ref(x, va, sigma, nxt, sig[1].double(), 0.7, noise=torch.zeros_like(x),
                          compute_dtype=torch.float64).mean
        mb = sde_step_ref(x, vb, sigma, nxt, sig[1].double(), 0.7, noise=torch.zeros_like(x),
                          compute_dtype=torch.float64).mean
        dt = float(sig[i + 1] - sig[i])
        factor = 1.0 if i == 0 else 1 + 0.7**2 / 2
        torch.testing.assert_close(ma - mb, factor * dt * (va - vb), atol=1e-10, rtol=1e-6)


def test_given_prev_sample_rescoring_and_grad() -> None:
    sig = flow_match_sigmas(10, 3.0)
    x = torch.randn(4, 3, 5, 5)
    v = torch.randn_like(x, requires_grad=True)
    first = sde_step(x, v.detach(), sig[3], sig[4], sig[1], 0.7, generator=torch.Generator().manual_seed(1))
    again = sde_step(x, v, sig[3], sig[4], sig[1], 0.7, prev_sample=first.sample)
    torch.testing.assert_close(again.log_prob, first.log_prob, atol=1e-5, rtol=1e-5)
    again.log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_generator_determinism() -> None:
    sig = flow_match_sigmas(10, 3.0)
    x, v = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    a = sde_step(x, v, sig[2], sig[3], sig[1], 0.7, generator=torch.Generator().manual_seed(5)).sample
    b = sde_step(x, v, sig[2], sig[3], sig[1], 0.7, generator=torch.Generator().manual_seed(5)).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ode_step_and_cfg(dtype) -> None:
    x, v = torch.randn(3, 4, 5, 5).to(dtype), torch.randn(3, 4, 5, 5).to(dtype)
    sigma, nxt = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.3, 0.0])
    out = ode_step(x, v, sigma, nxt)
    ref = x.double() + (nxt - sigma).double().view(-1, 1, 1, 1) * v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5 if dtype == torch.float32 else 3e-2, rtol=1e-2)
    vu, vc = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(cfg_combine(vu, vc, 4.5), vu + 4.5 * (vc - vu))
