"""LEGACY PARITY: engine.ops against the dispatch it replaces (engine/sampling/steps.py over engine/dispatch.py and
engine/sampling/kernel_backends.py), bit for bit, for every request on this machine. Delete this file together
with those modules.

lora_segmented / qk_rmsnorm: the old adapters (engine/models/multi_lora.py `segmented_op`, engine/models/
attention.py `_qk_norm_*`) are compared through the kernel functions they returned, not imported (peft and
diffusers cost ~6 s of import). One intended difference: under the CPU interpreter the old `auto` ran the
qk_rmsnorm kernel; the one availability rule makes `auto` run its torch twin there.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine import dispatch, ops
from engine.ops import registry
from engine.sampling import steps as legacy

SIG = torch.linspace(1.0, 0.0, 11)
REQUESTS = ["auto", "torch", "triton"]


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    for module in (dispatch, registry):
        monkeypatch.setattr(module, "_WARNED", set())
    monkeypatch.setattr(dispatch, "_CHOICE", {})
    monkeypatch.setattr(registry, "_CHOICE", {})
    monkeypatch.setattr(registry, "_DEFAULT", "auto")
    for var in [v for v in os.environ if v.startswith("FLOWOPD_BACKEND")]:
        monkeypatch.delenv(var)


@pytest.fixture(params=REQUESTS)
def request_backend(request, monkeypatch) -> str:
    monkeypatch.setenv("FLOWOPD_BACKEND", request.param)
    return request.param


def _same(new, old) -> None:
    """Equal fields (or tensors), bit for bit, with equal dtypes."""
    if isinstance(old, torch.Tensor):
        new, old = [new], [old]
    else:
        new = [new.sample, new.mean, new.log_prob, new.std]
        old = [old.sample, old.mean, old.log_prob, old.std]
    for a, b in zip(new, old, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sde_ode_cfg_match_legacy(request_backend: str, dtype: torch.dtype) -> None:
    x, v, eps = (torch.randn(2, 3, 4, 5).to(dtype) for _ in range(3))
    sigma, nxt = SIG[[0, 7]], SIG[[1, 8]]
    for kw in ({"noise": eps}, {"prev_sample": x + 0.1}, {}):
        args = (x, v, sigma, nxt, SIG[1], 0.7)
        gen = {} if kw else {"generator": torch.Generator().manual_seed(4)}
        new = ops.sde_step(*args, **kw, **gen)
        gen = {} if kw else {"generator": torch.Generator().manual_seed(4)}
        _same(new, legacy.sde_step(*args, **kw, **gen))
    _same(ops.ode_step(x, v, sigma, nxt), legacy.ode_step(x, v, sigma, nxt))
    _same(ops.ode_step(x, v, 0.5, 0.25), legacy.ode_step(x, v, 0.5, 0.25))
    _same(ops.cfg_combine(x, v, 4.5), legacy.cfg_combine(x, v, 4.5))


def test_loss_path_gradients_match_legacy(request_backend: str) -> None:
    """Re-scoring stored transitions (the OPD loss): log_prob, mean and the gradients into v and x."""
    x0, v0 = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    prev = torch.randn(2, 3, 5, 5)
    results = []
    for step in (ops.sde_step, legacy.sde_step):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        r = step(x, v, SIG[3], SIG[4], SIG[1], 0.7, prev_sample=prev)
        loss = r.log_prob.sum() + r.mean.square().sum()
        results.append([r.log_prob.detach(), *torch.autograd.grad(loss, (x, v))])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_indexed_steps_match_legacy(request_backend: str) -> None:
    x, v, vc = (torch.randn(2, 3, 4, 5) for _ in range(3))
    step = torch.tensor([0, 9])
    cfg = dict(v_uncond=v, v_cond=vc.bfloat16(), guidance=3.0)
    for vv, vel, kw in ((v, {}, {"seed": torch.tensor([5, 6]), "offset": 2}), (None, cfg, {"noise": vc}),
                        (None, cfg, {"prev_sample": x + 0.2}), (v, {}, {"seed": 3, "return_mean": False})):
        _same(ops.sde_step_indexed(x, vv, SIG, step, 0.7, **vel, **kw),
              legacy.sde_step_indexed(x, vv, SIG, step, 0.7, **vel, **kw))
        _same(ops.ode_step_indexed(x, vv, SIG, step, **vel), legacy.ode_step_indexed(x, vv, SIG, step, **vel))
    with torch.no_grad():  # in place, as a graph-captured loop
        bufs = [x.clone(), x.clone()]
        for fn, buf in zip((ops.sde_step_indexed, legacy.sde_step_indexed), bufs):
            fn(buf, None, SIG, step, 0.7, **cfg, seed=9, out=buf)
        assert torch.equal(*bufs)
        for fn, buf in zip((ops.ode_step_indexed, legacy.ode_step_indexed), bufs):
            fn(buf, v, SIG, step, out=buf)
        assert torch.equal(*bufs)


def test_lora_segmented_and_qk_rmsnorm_match_the_old_adapters(request_backend: str) -> None:
    from kernels.lora_segmented import lora_segmented as lora_kernel
    from kernels.lora_segmented import lora_segmented_torch
    from kernels.qk_rmsnorm import joint_qk_rmsnorm

    x, w, bias = torch.randn(3, 2, 16), torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    meta = (torch.tensor([1.0, 0.5]), torch.tensor([0, 1, 3], dtype=torch.int32),
            torch.tensor([1, 0], dtype=torch.int32))
    # segmented_op(cpu): the bmm fallback under auto, the kernel when triton is asked for (no fallback warning)
    old = lora_kernel if request_backend == "triton" else lora_segmented_torch
    assert torch.equal(ops.lora_segmented(x, w, bias, a, b, *meta, 1), old(x, w, bias, a, b, *meta, 1))
    ys = [torch.randn(2, 3, 3 * 2 * 8), torch.randn(2, 4, 3 * 2 * 8)]
    qk = (ys, [torch.randn(8), None], [None, torch.randn(8)], [True, True], [True, False], 2, 1e-6)
    old_qk = joint_qk_rmsnorm(*qk, use_triton=None if request_backend == "triton" else False)
    for got, want in zip(ops.qk_rmsnorm(*qk), old_qk, strict=True):
        assert torch.equal(got, want)
