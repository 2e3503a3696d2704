"""The kernel launches as torch custom ops (kernels/sde_step.py, ode_step.py, lora_segmented.py, qk_rmsnorm.py).

`torch.library.opcheck` runs each op against its schema (declared mutation of `out` only), its fake impl (output
shapes, dtypes and strides of the real op, on odd shapes), and AOT dispatch with dynamic shapes; then
torch.compile(fullgraph=True, backend="aot_eager") of the public kernel functions, forward and backward, must
give bit for bit what eager gives, with the launches as opaque op nodes in the graphs (eager calls skip the op
layer: see kernels/sde_step.py). On CPU the real ops run in the Triton interpreter (tests/conftest.py); the
fake impls are what the compiler traces, so compiling works the same here as on a GPU. Tiny shapes: every
interpreter program costs ~2 ms.
"""

from __future__ import annotations

import pytest
import torch

from kernels import lora_segmented as lk
from kernels import ode_step as ok
from kernels import qk_rmsnorm as qkn
from kernels import sde_step as sk
from kernels.runtime import triton_runs_here

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs a GPU or TRITON_INTERPRET=1")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIG = torch.linspace(1.0, 0.0, 11, device=DEV)
SHAPE = (3, 5, 7)  # B = 3 rows of N = 35: one program per row, a masked tail


def _rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, device=DEV).to(dtype)


# The first case of each op gets every opcheck test; the others the schema and fake-tensor checks only (the AOT
# dispatch test traces and reruns the op, ~0.5 s a case in the interpreter).
_FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
_QUICK = ("test_schema", "test_faketensor")


def _opcheck(op, args: tuple, full: bool = True) -> None:
    torch.library.opcheck(op, args, test_utils=_FULL if full else _QUICK)


def _sde_args(noise_mode: int, cfg: bool, dtype: torch.dtype, return_mean: bool, out: bool) -> tuple:
    x, v, vc = (_rand(*SHAPE, dtype=dtype) for _ in range(3))
    aux = {sk.NOISE_PHILOX: None, sk.NOISE_GIVEN: _rand(*SHAPE), sk.NOISE_PREV: _rand(*SHAPE, dtype=dtype)}[noise_mode]
    step = torch.tensor([0, 4, 9], device=DEV, dtype=torch.int32)
    seed = torch.tensor([11, 12, 13], device=DEV)
    offset = torch.tensor([2], device=DEV)
    return ("triton", x, v, vc if cfg else None, aux, SIG, step, seed, offset, 1, 1, 0.7, 2.5, noise_mode,
            return_mean, torch.empty_like(x) if out else None)


@pytest.mark.parametrize(
    "noise_mode,cfg,dtype,return_mean,out",
    [
        (sk.NOISE_PHILOX, False, torch.float32, True, False),
        (sk.NOISE_GIVEN, True, torch.bfloat16, False, False),
        (sk.NOISE_PREV, False, torch.float16, True, False),
        (sk.NOISE_PHILOX, True, torch.float32, False, True),
    ],
    ids=["philox", "given-cfg-bf16-nomean", "prev-fp16", "philox-cfg-out"],
)
def test_opcheck_sde_step_fwd(noise_mode, cfg, dtype, return_mean, out) -> None:
    _opcheck(torch.ops.flowopd.sde_step_kernel_fwd.default, _sde_args(noise_mode, cfg, dtype, return_mean, out),
             full=noise_mode == sk.NOISE_PHILOX)  # with and without the mutated `out`


@pytest.mark.parametrize("noise_mode,cfg,grads", [(sk.NOISE_PHILOX, True, (True, True)),
                                                  (sk.NOISE_PREV, False, (False, True)),
                                                  (sk.NOISE_GIVEN, False, (True, False))],
                         ids=["philox-cfg", "prev-gv-only", "given-gx-only"])
def test_opcheck_sde_step_bwd(noise_mode, cfg, grads) -> None:
    _, x, v, vc, aux, table, step, seed, offset, next_off, sig1, a, g, mode, _, _ = _sde_args(
        noise_mode, cfg, torch.float32, True, False)
    g_sample = None if noise_mode == sk.NOISE_PREV else _rand(*SHAPE)
    _opcheck(torch.ops.flowopd.sde_step_kernel_bwd.default,
             (x, v, vc, aux, table, step, seed, offset, next_off, sig1, a, g, mode, g_sample, _rand(*SHAPE), _rand(3),
              *grads), full=noise_mode == sk.NOISE_PHILOX)


@pytest.mark.parametrize("cfg,out", [(False, False), (True, True)], ids=["plain", "cfg-out"])
def test_opcheck_ode_step_and_cfg_combine(cfg: bool, out: bool) -> None:
    x, v, vc = (_rand(*SHAPE, dtype=torch.bfloat16) for _ in range(3))
    step = torch.tensor([3], device=DEV)
    dest = torch.empty_like(x) if out else None
    _opcheck(torch.ops.flowopd.ode_step_kernel_fwd.default, ("triton", x, v, vc if cfg else None, SIG, step, 1, 3.0,
                                                             dest))
    _opcheck(torch.ops.flowopd.cfg_combine_kernel_fwd.default, (x, _rand(*SHAPE), 4.5), full=not cfg)


def _lora_inputs(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 37, generator=gen).to(DEV, dtype)
    weight = (torch.randn(29, 37, generator=gen) / 6).to(DEV, dtype)
    bias = torch.randn(29, generator=gen).to(DEV, dtype)
    a = (torch.randn(3, 9, 37, generator=gen) / 6).to(DEV, dtype)
    b = (torch.randn(3, 29, 9, generator=gen) / 3).to(DEV, dtype)
    scales = torch.tensor([0.5, 2.0, 1.25], device=DEV)
    # every row has an adapter: h's rows of slot -1 are left unwritten (by design), which opcheck would compare
    indptr = torch.tensor([0, 2, 2, 5], device=DEV, dtype=torch.int32)
    adapter = torch.tensor([1, 0, 2], device=DEV, dtype=torch.int32)
    return x, weight, bias, a, b, scales, indptr, adapter


def test_opcheck_lora_segmented_fwd_bwd() -> None:
    x, weight, bias, a, b, scales, indptr, adapter = _lora_inputs()
    _opcheck(torch.ops.flowopd.lora_segmented_fwd.default, (x, weight, bias, a, b, scales, indptr, adapter))
    _, h = torch.ops.flowopd.lora_segmented_fwd(x, weight, None, a, b, scales, indptr, adapter)
    gy = torch.randn(5, 3, 29, device=DEV)
    for trainable, needs in ((-1, (True, True, True)), (2, (False, True, False))):
        _opcheck(torch.ops.flowopd.lora_segmented_bwd.default,
                 (x, weight, a, b, scales, indptr, adapter, h, gy, trainable, *needs), full=trainable == -1)


def _recording_backend(seen: set[str]):
    """aot_eager, noting every op Dynamo's graphs call (the autograd.Function's fwd/bwd are subgraphs)."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for m in gm.modules():
            if isinstance(m, torch.fx.GraphModule):
                seen.update(str(n.target) for n in m.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    return backend


def _flowopd(seen: set[str]) -> set[str]:
    return {s.removeprefix("flowopd.").removesuffix(".default") for s in seen if s.startswith("flowopd.")}


def _equal(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_compile_fullgraph_sampling_kernels_bit_identical() -> None:
    """One step of a rollout and of the loss (SDE with CFG + its backward, ODE, CFG combine), compiled whole."""
    step = torch.tensor([2, 5, 8], device=DEV)
    x, vu, vc = (_rand(*SHAPE) for _ in range(3))

    def loss_path(x, vu, vc):
        r = sk.sde_step_indexed(x, None, SIG, step, 0.7, v_uncond=vu, v_cond=vc, guidance=3.0, seed=5, offset=1)
        y = ok.ode_step_indexed(r.sample, ok.cfg_combine(vu, vc, 2.0), SIG, step)
        return r.log_prob.sum() + r.mean.square().sum() + y.sum()

    def rollout(x, vu, vc):  # no grad: in place into `out`, as a graph-captured loop
        buf = x.clone()
        sk.sde_step_indexed(buf, None, SIG, step, 0.7, v_uncond=vu, v_cond=vc, guidance=3.0, seed=5, out=buf,
                            return_mean=False)
        ok.ode_step_indexed(buf, vu, SIG, step, out=buf)
        return buf

    seen: set[str] = set()
    compiled = torch.compile(loss_path, backend=_recording_backend(seen), fullgraph=True)
    results = []
    for fn in (compiled, loss_path):
        leaves = [t.clone().requires_grad_() for t in (x, vu, vc)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    _equal(*results)
    assert _flowopd(seen) == {"sde_step_kernel_fwd", "sde_step_kernel_bwd", "ode_step_kernel_fwd",
                              "cfg_combine_kernel_fwd"}  # opaque launches, not traced Python
    with torch.no_grad():
        _equal([torch.compile(rollout, backend="aot_eager", fullgraph=True)(x, vu, vc)], [rollout(x, vu, vc)])


def test_compile_fullgraph_lora_segmented_bit_identical() -> None:
    x, weight, bias, a, b, scales, indptr, adapter = _lora_inputs()

    def f(x, a, b):
        return lk.lora_segmented(x, weight, bias, a, b, scales, indptr, adapter, 1).square().sum()

    seen: set[str] = set()
    results = []
    for fn in (torch.compile(f, backend=_recording_backend(seen), fullgraph=True), f):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    _equal(*results)
    assert _flowopd(seen) == {"lora_segmented_fwd", "lora_segmented_bwd"}


def _qk_inputs():
    ys = [_rand(2, 5, 3 * 2 * 12), _rand(2, 3, 3 * 2 * 12)]  # two streams, H = 2, D = 12
    return ys, [_rand(12), None], [_rand(12), _rand(12)], [True, True], [True, False], 2, 1e-6


def test_opcheck_qk_rmsnorm_fwd_bwd() -> None:
    ys, wq, wk, nq, nk, heads, eps = _qk_inputs()
    _opcheck(torch.ops.flowopd.qk_rmsnorm_fwd.default, (ys, wq, wk, nq, nk, heads, eps))
    grads = [_rand(2, 8, 2, 12) for _ in range(3)]
    _opcheck(torch.ops.flowopd.qk_rmsnorm_bwd.default, (ys, wq, wk, nq, nk, heads, eps, *grads,
                                                        [True, False, False, True]))


def test_compile_fullgraph_qk_rmsnorm_bit_identical() -> None:
    ys, wq, wk, nq, nk, heads, eps = _qk_inputs()

    def f(y0, y1, w):
        q, k, v = qkn.joint_qk_rmsnorm([y0, y1], [w, None], wk, nq, nk, heads, eps, use_triton=True)
        return q.square().sum() + k.sum() + v.square().sum()

    seen: set[str] = set()
    results = []
    for fn in (torch.compile(f, backend=_recording_backend(seen), fullgraph=True), f):
        leaves = [t.clone().requires_grad_() for t in (*ys, wq[0])]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    _equal(*results)
    assert _flowopd(seen) == {"qk_rmsnorm_fwd", "qk_rmsnorm_bwd"}
