"""Fused SDE / ODE step kernels (kernels/sde_step.py, kernels/ode_step.py, csrc/) against float64 references.

CPU: Triton runs in the interpreter (TRITON_INTERPRET=1 from conftest); every output buffer is NaN-poisoned
(FLOWOPD_POISON=1) so an element a kernel skips fails the comparison. Tolerance rule (STYLE.md): the kernel's
max error against the float64 reference is at most 2x that of the PyTorch chain at the same input dtype, plus a
floor of a few float32 ulps of the output scale (the in-kernel normals are float32 transcendentals, ~1e-6).
CUDA tests (skipped here): triton and cuda vs reference, cuda vs triton noise, CUDA-graph capture + replay.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from engine import ops
from engine.ops import registry
from engine.sampling.schedule import flow_match_sigmas
from kernels import ode_step as ode_k
from kernels import sde_step as sde_k
from kernels.philox import noise_groups, philox4x32_10_ref, philox_normal_ref

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIG = flow_match_sigmas(10, 3.0)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 5, 17, 19), (2, 3, 37, 41), (1, 7, 3, 5)]  # N = 1615, 4551 (2 programs per row), 105


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWOPD_POISON", "1")


def _rule(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, name: str, floor: float = 1e-6) -> None:
    """max |out - ref| <= 2 max |base - ref| + floor * max |ref| (ref float64, base = PyTorch at the same dtype).

    The floor is at least half an ulp of out's dtype at the output scale: a 16-bit output whose float32 value sits
    within float32 rounding of a tie may round either way, and PyTorch's own max error may miss the largest values.
    """
    assert not torch.isnan(out).any(), f"{name}: NaN (an element was not written)"
    ref = ref.double()
    scale = ref.abs().max().item()
    floor = max(floor, torch.finfo(out.dtype).eps / 2)
    err = (out.double() - ref).abs().max().item()
    err_t = (base.double() - ref).abs().max().item()
    assert err <= 2 * err_t + floor * scale + 1e-12, f"{name}: kernel {err:.3g} vs torch {err_t:.3g} ({scale=:.3g})"


def _steps(b: int) -> torch.Tensor:
    """Per-row steps covering sigma = 1 (step 0) and sigma_next = 0 (step 9)."""
    return torch.tensor([0, 9, 4, 7, 2][:b], device=DEV) if b <= 5 else torch.randint(0, 10, (b,), device=DEV)


def _inputs(shape, dtype, mode: str, cfg: bool):
    x = torch.randn(shape, device=DEV).to(dtype)
    vs = [torch.randn(shape, device=DEV).to(dtype) for _ in range(2 if cfg else 1)]
    kw: dict = dict(seed=torch.tensor([12345], device=DEV), offset=3)
    if cfg:
        kw.update(v_uncond=vs[0], v_cond=vs[1], guidance=4.5)
    if mode == "given":
        kw["noise"] = torch.randn(shape, device=DEV)
    return x, None if cfg else vs[0], kw


def _prev_for(x, v, kw, step, sig):
    """A realistic stored transition: the reference's own sample, rounded to x's dtype."""
    r = sde_k.sde_step_indexed_ref(x.double(), None if v is None else v.double(), sig.double(), step, 0.7,
                                   **_f64(kw), compute_dtype=torch.float64)
    return r.sample.to(x.dtype)


def _f64(kw: dict) -> dict:
    return {k: (w.double() if isinstance(w, torch.Tensor) and w.is_floating_point() else w) for k, w in kw.items()}


# --------------------------------------------------------------------------------------------- noise stream


def test_philox_known_answers() -> None:
    """Random123's kat_vectors for philox4x32-10 (the generator of curand and torch)."""
    t = lambda *v: [torch.tensor([x], dtype=torch.int64) for x in v]  # noqa: E731
    cases = [
        (t(0, 0, 0, 0), t(0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (t(*[0xFFFFFFFF] * 4), t(0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (t(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), t(0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for c, k, want in cases:
        assert tuple(int(r) for r in philox4x32_10_ref(tuple(c), *k)) == want


def _kernel_noise(shape, seed, offset, backend: str = "triton") -> torch.Tensor:
    """z from the fused step with x = v = 0 (then mu = 0 and x' = std z)."""
    x = torch.zeros(shape, device=DEV)
    step = torch.tensor([5], device=DEV)
    r = sde_k.sde_step_indexed(x, torch.zeros_like(x), SIG.to(DEV), step, 0.7, seed=seed, offset=offset,
                               backend=backend)
    _, dt, s = sde_k.sigma_terms_ref(SIG.to(DEV), step, shape[0], 0.7, dtype=torch.float64)
    return r.sample.double() / (s * torch.sqrt(-dt)).reshape(-1, *[1] * (len(shape) - 1))


def test_kernel_noise_is_the_reference_stream() -> None:
    shape = (3, 2, 9, 13)  # N = 234: Q = 64, lane 3 partly past the end
    for seed, offset in [(7, 0), (-(2**62) + 5, 2**33 + 1), (torch.tensor([1, 2**40, -3], device=DEV), 9)]:
        z = _kernel_noise(shape, seed, offset)
        ref = philox_normal_ref(seed, offset, shape, DEV)
        torch.testing.assert_close(z, ref, atol=3e-6, rtol=3e-6)


def test_noise_statistics_and_independence() -> None:
    shape = (4, 16, 32, 32)
    n_row = 16 * 32 * 32
    q = noise_groups(n_row)
    z = _kernel_noise(shape, 2024, 0).reshape(4, -1)
    flat = z.reshape(-1)
    n = flat.numel()
    tol = 5 / math.sqrt(n)  # 5 sigma of a sample mean / correlation of n values
    assert abs(flat.mean().item()) < tol
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((flat**4).mean() - 3).item()) < 5 * math.sqrt(96 / n)  # kurtosis of a normal
    assert abs((flat.abs() < 1).double().mean().item() - 0.682689) < 5 * math.sqrt(0.2166 / n)
    srt = flat.sort().values.cpu()
    cdf = 0.5 * (1 + torch.erf(srt / math.sqrt(2)))
    ks = (cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max().item()
    assert ks < 1.95 / math.sqrt(n)  # Kolmogorov-Smirnov at 0.1 %

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    assert abs(corr(z[:, :-1], z[:, 1:])) < 5 / math.sqrt(z[:, 1:].numel())  # adjacent elements (groups)
    for lane in (1, 2, 3):  # elements fed by the same Philox call (lanes 0/1 are one Box-Muller pair)
        assert abs(corr(z[:, :q], z[:, lane * q : (lane + 1) * q])) < 5 / math.sqrt(4 * q)
    assert abs(corr(z[0], z[1])) < 5 / math.sqrt(n_row)  # rows
    other_offset = _kernel_noise(shape, 2024, 1).reshape(4, -1)  # the next step
    other_seed = _kernel_noise(shape, 2025, 0).reshape(4, -1)
    assert abs(corr(z, other_offset)) < tol and abs(corr(z, other_seed)) < tol
    assert abs(corr(z**2, other_offset**2)) < 2 * tol  # not just uncorrelated: no shared magnitudes either


def test_per_row_seeds_do_not_depend_on_batch_position() -> None:
    shape = (3, 4, 7, 5)
    seeds = torch.tensor([11, 22, 33], device=DEV)
    z = _kernel_noise(shape, seeds, 4)
    for i in (0, 2):
        alone = _kernel_noise((1, *shape[1:]), seeds[i : i + 1], 4)
        torch.testing.assert_close(z[i : i + 1], alone, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["philox", "given", "prev"])
@pytest.mark.parametrize("cfg", [False, True])
def test_sde_forward_vs_float64(dtype: torch.dtype, mode: str, cfg: bool) -> None:
    sig = SIG.to(DEV)
    for shape in SHAPES:
        x, v, kw = _inputs(shape, dtype, mode, cfg)
        step = _steps(shape[0])
        if mode == "prev":
            kw["prev_sample"] = _prev_for(x, v, kw, step, sig)
        out = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
        ref = sde_k.sde_step_indexed_ref(x.double(), None if v is None else v.double(), sig.double(), step, 0.7,
                                         **_f64(kw), compute_dtype=torch.float64)
        base = sde_k.sde_step_indexed_ref(x, v, sig, step, 0.7, **kw)
        assert out.sample.dtype == dtype and out.mean.dtype == dtype and out.log_prob.dtype == torch.float32
        floor = 4e-6 if mode == "philox" else 1e-6
        for name in ("sample", "mean", "log_prob", "std"):
            _rule(getattr(out, name), getattr(ref, name), getattr(base, name), f"{shape} {name}", floor)


def test_given_eps_exactness() -> None:
    """eps = 0 gives x' = mu exactly and log p = -log std - log(2 pi)/2; a given eps is used as is."""
    shape = (3, 5, 17, 19)
    x, v = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV)
    step = _steps(3)
    sig = SIG.to(DEV)
    out = sde_k.sde_step_indexed(x, v, sig, step, 0.7, noise=torch.zeros_like(x))
    assert torch.equal(out.sample, out.mean)
    _, dt, s = sde_k.sigma_terms_ref(sig, step, 3, 0.7, dtype=torch.float64)
    torch.testing.assert_close(out.log_prob.double(), -torch.log(s * torch.sqrt(-dt)) - 0.5 * math.log(2 * math.pi),
                               atol=2e-6, rtol=1e-6)
    eps = torch.randn(shape, device=DEV)
    out = sde_k.sde_step_indexed(x, v, sig, step, 0.7, noise=eps)
    base = sde_k.sde_step_indexed_ref(x, v, sig, step, 0.7, noise=eps)  # the same float32 chain
    torch.testing.assert_close(out.sample, base.sample, atol=1e-6, rtol=1e-6)
    lp = -(eps.double() ** 2).mean(dim=(1, 2, 3)) / 2 - torch.log(s * torch.sqrt(-dt)) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob.double(), lp, atol=2e-6, rtol=1e-6)


def test_sigma_one_edge_and_cfg_fusion() -> None:
    shape = (2, 4, 9, 11)
    sig = SIG.to(DEV)
    x, vu, vc = (torch.randn(shape, device=DEV) for _ in range(3))
    eps = torch.randn(shape, device=DEV)
    step = torch.zeros(2, dtype=torch.int64, device=DEV)
    fused = sde_k.sde_step_indexed(x, None, sig, step, 0.7, v_uncond=vu, v_cond=vc, guidance=4.5, noise=eps)
    v = vu.double() + 4.5 * (vc.double() - vu.double())
    s = 0.7 * math.sqrt(1.0 / (1 - SIG[1].item()))  # sigma = 1: only the denominator takes sigma_1
    torch.testing.assert_close(fused.std, torch.full((2,), s, device=DEV), atol=1e-6, rtol=1e-6)
    dt = SIG[1].item() - 1.0
    mu = x.double() + (v + s * s / 2 * x.double()) * dt  # (1 - sigma) v vanishes at sigma = 1
    torch.testing.assert_close(fused.mean.double(), mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.sample.double(), mu + s * math.sqrt(-dt) * eps.double(), atol=1e-5, rtol=1e-5)


def test_many_programs_and_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks: 72 programs per row and a multi-pass partial reduction; same answer as one big block."""
    shape = (2, 3, 37, 41)
    x, v, kw = _inputs(shape, torch.float32, "philox", False)
    sig, step = SIG.to(DEV), _steps(2)
    big = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
    monkeypatch.setattr(sde_k, "_BLOCK_G", 16)
    monkeypatch.setattr(sde_k, "_BLOCK_P", 16)
    small = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
    assert torch.equal(small.sample, big.sample) and torch.equal(small.mean, big.mean)
    torch.testing.assert_close(small.log_prob, big.log_prob, atol=1e-6, rtol=1e-6)


def test_determinism_and_offsets() -> None:
    shape = (3, 5, 17, 19)
    x, v, kw = _inputs(shape, torch.bfloat16, "philox", False)
    sig, step = SIG.to(DEV), _steps(3)
    a = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
    b = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
    for name in ("sample", "mean", "log_prob", "std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **{**kw, "offset": 4})
    assert torch.equal(c.mean, a.mean) and not torch.equal(c.sample, a.sample)


def test_out_in_place_and_no_mean() -> None:
    shape = (3, 5, 17, 19)
    x, v, kw = _inputs(shape, torch.float16, "philox", False)
    sig, step = SIG.to(DEV), _steps(3)
    want = sde_k.sde_step_indexed(x, v, sig, step, 0.7, **kw)
    buf = x.clone()
    got = sde_k.sde_step_indexed(buf, v, sig, step, 0.7, return_mean=False, out=buf, **kw)
    assert got.mean is None and got.sample.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, want.sample) and torch.equal(got.log_prob, want.log_prob)


# --------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["philox", "given", "prev"])
@pytest.mark.parametrize("cfg", [False, True])
def test_sde_backward_vs_float64(dtype: torch.dtype, mode: str, cfg: bool) -> None:
    shape = (3, 5, 17, 19)
    sig = SIG.to(DEV)
    x, v, kw = _inputs(shape, dtype, mode, cfg)
    step = _steps(3)
    if mode == "prev":
        kw["prev_sample"] = _prev_for(x, v, kw, step, sig)
    gm, gs, gl = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV), torch.randn(3, device=DEV)
    leaves = [x] + ([kw["v_uncond"], kw["v_cond"]] if cfg else [v])

    def grads(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() for t in leaves]
        kwi = {**(_f64(kw) if cast == torch.float64 else kw)}
        if cfg:
            kwi.update(v_uncond=ins[1], v_cond=ins[2])
        r = fn(ins[0], None if cfg else ins[1], kwi)
        loss = (r.mean.double() * gm).sum() + (r.log_prob.double() * gl).sum()
        if mode != "prev":
            loss = loss + (r.sample.double() * gs).sum()
        return torch.autograd.grad(loss, ins)

    out = grads(lambda a, b, k: sde_k.sde_step_indexed(a, b, sig, step, 0.7, **k), dtype)
    ref = grads(lambda a, b, k: sde_k.sde_step_indexed_ref(a, b, sig.double(), step, 0.7, **k,
                                                           compute_dtype=torch.float64), torch.float64)
    base = grads(lambda a, b, k: sde_k.sde_step_indexed_ref(a, b, sig, step, 0.7, **k), dtype)
    for name, o, r, b in zip(["x", "v_u" if cfg else "v", "v_c"], out, ref, base):
        assert o.dtype == dtype
        _rule(o, r, b, f"grad {name}", 4e-6 if mode == "philox" else 1e-6)


def test_backward_of_the_loss_path_through_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OPD loss re-scores stored transitions through engine sde_step(prev_sample=...): grads reach v."""
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "triton")
    calls = []
    real = sde_k._launch_bwd
    monkeypatch.setattr(sde_k, "_launch_bwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 3, 5, 5, device=DEV)
    v = torch.randn_like(x, requires_grad=True)
    first = ops.sde_step(x, v.detach(), SIG[3], SIG[4], SIG[1], 0.7, generator=torch.Generator().manual_seed(1))
    again = ops.sde_step(x, v, SIG[3], SIG[4], SIG[1], 0.7, prev_sample=first.sample)
    torch.testing.assert_close(again.log_prob, first.log_prob, atol=1e-5, rtol=1e-5)
    (again.log_prob.sum() + again.mean.square().sum()).backward()
    ref_v = v.detach().clone().requires_grad_()
    r = ops.sde_step_ref(x, ref_v, SIG[3], SIG[4], SIG[1], 0.7, prev_sample=first.sample)
    (r.log_prob.sum() + r.mean.square().sum()).backward()
    assert calls, "the kernel backward did not run"
    torch.testing.assert_close(v.grad, ref_v.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- ODE and CFG


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_ode_step_and_backward(dtype: torch.dtype, cfg: bool) -> None:
    shape = (3, 5, 17, 19)
    sig, step = SIG.to(DEV), _steps(3)
    x, v, kw = _inputs(shape, dtype, "given", cfg)
    kw = {k: w for k, w in kw.items() if k in ("v_uncond", "v_cond", "guidance")}
    leaves = [x] + ([kw["v_uncond"], kw["v_cond"]] if cfg else [v])
    g = torch.randn(shape, device=DEV)

    def run(fn, cast, **extra):
        ins = [t.detach().to(cast).requires_grad_() for t in leaves]
        k = dict(kw, v_uncond=ins[1], v_cond=ins[2]) if cfg else {}
        y = fn(ins[0], None if cfg else ins[1], sig.to(torch.float64 if cast == torch.float64 else torch.float32),
               step, **k, **extra)
        return (y, *torch.autograd.grad((y.double() * g).sum(), ins))

    out = run(ode_k.ode_step_indexed, dtype)
    ref = run(ode_k.ode_step_indexed_ref, torch.float64, compute_dtype=torch.float64)
    base = run(ode_k.ode_step_indexed_ref, dtype)
    for name, o, r, b in zip(["x'", "gx", "gv", "gvc"], out, ref, base):
        assert o.dtype == dtype
        _rule(o, r, b, name)
    with torch.no_grad():  # in place, as a graph-captured loop would
        buf = x.clone()
        ode_k.ode_step_indexed(buf, None if cfg else v, sig, step, **kw, out=buf)
        torch.testing.assert_close(buf, out[0].detach(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_combine_kernel(dtype: torch.dtype) -> None:
    vu, vc = (torch.randn(3, 7, 11, 13, device=DEV).to(dtype) for _ in range(2))
    go = torch.randn(3, 7, 11, 13, device=DEV, dtype=torch.float64)

    def run(fn, cast):
        a, b = vu.to(cast).requires_grad_(), vc.to(cast).requires_grad_()
        y = fn(a, b, 4.5)
        return (y, *torch.autograd.grad((y.double() * go).sum(), (a, b)))

    out, ref, base = run(ode_k.cfg_combine, dtype), run(ode_k.cfg_combine_ref, torch.float64), run(
        ode_k.cfg_combine_ref, dtype)
    for name, o, r, b in zip(["v", "gv_u", "gv_c"], out, ref, base):
        assert o.dtype == dtype
        _rule(o, r, b, name)


# --------------------------------------------------------------------------------------------- dispatch


def test_dispatch_uses_kernel_when_asked_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = sde_k._launch_fwd
    monkeypatch.setattr(sde_k, "_launch_fwd", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x = torch.randn(2, 3, 5, 7, device=DEV)
    v, eps = torch.randn_like(x), torch.randn_like(x)
    args = (x, v, SIG[2], SIG[3], SIG[1], 0.7)
    want = ops.sde_step_ref(*args, noise=eps)
    if DEV.type == "cpu":  # auto never picks the interpreter
        ops.sde_step(*args, noise=eps)
        assert not calls
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "triton")
    got = ops.sde_step(*args, noise=eps)
    assert calls == ["triton"]
    torch.testing.assert_close(got.sample, want.sample, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.log_prob, want.log_prob, atol=1e-6, rtol=1e-6)
    # inputs the kernel cannot take go to the reference
    ops.sde_step(x.double(), v.double(), SIG[2], SIG[3], SIG[1], 0.7, noise=eps.double())
    ops.sde_step(*args, noise=eps, compute_dtype=torch.float64)
    ops.sde_step(*args, noise=eps.clone().requires_grad_())
    assert calls == ["triton"]
    if DEV.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: torch
        torch.testing.assert_close(ops.sde_step(*args, noise=eps).sample, want.sample)
        assert calls == ["triton"]


def test_cuda_backend_requested_without_native_falls_back(monkeypatch, caplog) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    from kernels.native import native_available

    native_available.cache_clear()
    monkeypatch.setattr(registry, "_WARNED", set())  # an earlier test may have logged this pair already
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "cuda")
    x, v, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with caplog.at_level(logging.INFO):
        out = ops.sde_step(x, v, 0.5, 0.4, SIG[1], 0.7, noise=eps)
        ops.sde_step(x, v, 0.5, 0.4, SIG[1], 0.7, noise=eps)
        assert not native_available() and not native_available()
    want = ops.sde_step_ref(x, v, 0.5, 0.4, SIG[1], 0.7, noise=eps)
    torch.testing.assert_close(out.sample, want.sample, atol=1e-6, rtol=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("backend 'cuda' for sde_step is not available" in m for m in lines) == 1, lines  # the dispatch's
    assert sum("native CUDA ops unavailable" in m for m in lines) == 1, lines  # and the native loader's one line
    assert "cuda" not in ops.available_backends("sde_step")


def test_indexed_entry_point_same_noise_on_every_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine sde_step_indexed: the torch reference draws the kernels' Philox stream, so backends agree."""
    sig = SIG.to(DEV)
    x, v = torch.randn(3, 4, 6, 10, device=DEV), torch.randn(3, 4, 6, 10, device=DEV)
    step = torch.tensor([0, 3, 8], device=DEV)
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP_INDEXED", "torch")
    a = ops.sde_step_indexed(x, v, sig, step, 0.7, seed=99, offset=2)
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP_INDEXED", "triton")
    b = ops.sde_step_indexed(x, v, sig, step, 0.7, seed=99, offset=2)
    torch.testing.assert_close(b.sample, a.sample, atol=4e-6, rtol=1e-5)
    torch.testing.assert_close(b.log_prob, a.log_prob, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("FLOWOPD_BACKEND_ODE_STEP_INDEXED", "triton")
    torch.testing.assert_close(ops.ode_step_indexed(x, v, sig, step),
                               ode_k.ode_step_indexed_ref(x, v, sig, step), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------- CUDA only


def _native() -> bool:
    from kernels.native import native_available

    return native_available()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["philox", "given", "prev"])
def test_cuda_backends_vs_float64(backend: str, dtype: torch.dtype, mode: str) -> None:
    if backend == "cuda" and not _native():
        pytest.skip("native ops not built (pip install -e . or the CMake build)")
    sig = SIG.to(DEV)
    for shape in [*SHAPES, (16, 16, 64, 64), (5, 16, 33, 31)]:
        for cfg in (False, True):
            x, v, kw = _inputs(shape, dtype, mode, cfg)
            step = torch.randint(0, 10, (shape[0],), device=DEV)
            step[0] = 0
            if mode == "prev":
                kw["prev_sample"] = _prev_for(x, v, kw, step, sig)
            out = sde_k.sde_step_indexed(x, v, sig, step, 0.7, backend=backend, **kw)
            ref = sde_k.sde_step_indexed_ref(x.double(), None if v is None else v.double(), sig.double(), step, 0.7,
                                             **_f64(kw), compute_dtype=torch.float64)
            base = sde_k.sde_step_indexed_ref(x, v, sig, step, 0.7, **kw)
            for name in ("sample", "mean", "log_prob", "std"):
                _rule(getattr(out, name), getattr(ref, name), getattr(base, name), f"{shape} {cfg} {name}",
                      4e-6 if mode == "philox" else 1e-6)
            y = ode_k.ode_step_indexed(x, v, sig, step, backend=backend, **{k: w for k, w in kw.items()
                                                                            if k in ("v_uncond", "v_cond", "guidance")})
            assert not torch.isnan(y).any()


@pytest.mark.cuda
def test_cuda_and_triton_draw_the_same_noise() -> None:
    if not _native():
        pytest.skip("native ops not built")
    shape = (4, 16, 64, 64)
    a = _kernel_noise(shape, 5, 1, "triton")
    b = _kernel_noise(shape, 5, 1, "cuda")
    torch.testing.assert_close(a, b, atol=5e-6, rtol=5e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend: str) -> None:
    """A captured step replays with new step/seed values (device tensors) and matches eager bit for bit."""
    if backend == "cuda" and not _native():
        pytest.skip("native ops not built")
    sig = SIG.to(DEV)
    x = torch.randn(4, 16, 32, 32, device=DEV, dtype=torch.bfloat16)
    vu, vc = torch.randn_like(x), torch.randn_like(x)
    step = torch.zeros(1, dtype=torch.int64, device=DEV)
    seed = torch.ones(1, dtype=torch.int64, device=DEV)

    def run(st, sd):
        return sde_k.sde_step_indexed(x, None, sig, st, 0.7, v_uncond=vu, v_cond=vc, guidance=4.5, seed=sd, offset=st,
                                      backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        run(step, seed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(step, seed)
    for k, sd in [(0, 1), (3, 7), (9, 123456789)]:
        step.fill_(k)
        seed.fill_(sd)
        graph.replay()
        eager = run(torch.tensor([k], device=DEV), sd)
        for name in ("sample", "mean", "log_prob", "std"):
            assert torch.equal(getattr(static, name), getattr(eager, name)), (k, name)


@pytest.mark.cuda
def test_cuda_graph_rollout_loop_in_place() -> None:
    """Ten SDE steps captured as one graph updating x in place (out=x), vs the eager loop."""
    sig = SIG.to(DEV)
    x0 = torch.randn(2, 16, 16, 16, device=DEV)
    v = torch.randn_like(x0)
    seed = torch.full((2,), 3, dtype=torch.int64, device=DEV)
    steps_t = [torch.full((1,), t, dtype=torch.int64, device=DEV) for t in range(10)]

    def loop(x):
        lps = []
        for t in range(10):
            lps.append(ops.sde_step_indexed(x, v, sig, steps_t[t], 0.7, seed=seed, offset=t, out=x).log_prob)
        return torch.stack(lps)

    eager_x = x0.clone()
    eager_lp = loop(eager_x)
    static_x = x0.clone()
    loop(static_x.clone())  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_lp = loop(static_x)
    static_x.copy_(x0)
    graph.replay()
    assert torch.equal(static_x, eager_x) and torch.equal(static_lp, eager_lp)


# --------------------------------------------------------------------------------------------- GPU lowering on CPU


def _aot_main() -> None:
    """Compile the Triton kernels for sm_90 without a GPU (triton.compile + the bundled ptxas); print PTX facts.

    Run in a subprocess without TRITON_INTERPRET, so the kernels are real JIT functions: the interpreter accepts
    code the compiler rejects, and this is the check that the GPU path at least lowers.
    """
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(fn, dtypes: dict[str, str], consts: dict, warps: int) -> str:
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtypes.get(name, dtypes.get("*", "fp32"))
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32" if name in ("noise_level", "guidance") else "i32"
                if name in ("N", "Q", "M"):  # as Triton specializes them for latent shapes (N = 16*64*64)
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

    i64 = {"step_ptr": "i64", "seed_ptr": "i64", "offset_ptr": "i64", "part_ptr": "fp32", "sig_ptr": "fp32",
           "glp_ptr": "fp32", "logp_ptr": "fp32", "std_ptr": "fp32"}
    facts = {}
    for dt, mode, cfg in [("bf16", 0, True), ("bf16", 1, False), ("bf16", 2, False), ("fp32", 0, False),
                          ("fp16", 2, True)]:
        ptx = compile_(sde_k._sde_step_fwd_kernel, {"*": dt, "aux_ptr": "fp32", **i64},
                       {"BLOCK_G": 1024, "NOISE": mode, "CFG": cfg, "WRITE_MEAN": mode == 2}, 4)
        facts[f"fwd_{dt}_{mode}_{cfg}"] = [ptx.count("ld.global.v4"), ptx.count("st.global.v4")]
    for mode in (0, 2):
        ptx = compile_(sde_k._sde_step_bwd_kernel, {"*": "bf16", **i64},
                       {"BLOCK_G": 1024, "NOISE": mode, "CFG": True, "HAS_GMEAN": True, "HAS_GSAMPLE": mode == 0,
                        "NEED_GX": True, "NEED_GV": True}, 4)
        facts[f"bwd_bf16_{mode}"] = [ptx.count("ld.global.v4"), ptx.count("st.global.v4")]
    compile_(sde_k._sde_logprob_kernel, i64, {"BLOCK_P": 128}, 4)
    ptx = compile_(ode_k._ode_step_kernel, {"*": "bf16", **i64}, {"BLOCK": 4096, "CFG": True}, 8)
    facts["ode_bf16"] = [ptx.count("ld.global.v4"), ptx.count("st.global.v4")]
    ptx = compile_(ode_k._cfg_combine_kernel, {"*": "bf16"}, {"BLOCK": 4096}, 8)
    facts["cfg_bf16"] = [ptx.count("ld.global.v4"), ptx.count("st.global.v4")]
    print(json.dumps(facts))


def test_triton_kernels_lower_to_sm90_with_16_byte_accesses() -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", "from tests.test_sde_kernel import _aot_main; _aot_main()"],
                         cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    # per program: 4 lanes x (x, v_u, v_c) loads and 4 lanes of x' stores, each one 16-byte vector per thread
    assert facts["fwd_bf16_0_True"][0] >= 12 and facts["fwd_bf16_0_True"][1] >= 4, facts
    for name, (loads, stores) in facts.items():
        assert loads > 0 and stores > 0, (name, facts)
