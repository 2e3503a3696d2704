"""Segmented multi-LoRA kernel (kernels/lora_segmented.py) against its float64 per-segment reference.

Tolerance rule: the kernel may be at most ~2x as far from the float64 reference as plain PyTorch at the same
dtype (`lora_segmented_ref(upcast=False)` and its autograd), plus a few ulps of the output's magnitude.
On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from kernels.lora_segmented import (
    _expand,
    _shrink,
    lora_segmented,
    lora_segmented_ref,
    lora_segmented_torch,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and scratch buffers start as NaN (kernels/buffers.py): a skipped element cannot pass."""
    monkeypatch.setenv("FLOWOPD_POISON", "1")

# (B rows, T tokens per row or 0 for 2-D input, K in, N out, R padded rank, segments as (rows, slot))
CASES = [
    pytest.param(7, 5, 37, 29, 9, [(2, 1), (0, 0), (3, -1), (2, 2)], id="odd-empty-base"),
    pytest.param(6, 0, 70, 130, 20, [(1, 0), (2, 1), (1, 0), (1, -1)], id="2d-repeated-slot-uncovered"),
    pytest.param(3, 11, 16, 48, 33, [(3, 1)], id="one-segment-r33"),
    pytest.param(6, 110, 24, 40, 8, [(1, 2), (3, 0), (2, 1)], id="660-tokens-split-wgrad"),
]


def _make(b, t, k, n, r, segs, dtype, n_adapters=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, t, k) if t else (b, k)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    lora_a = (torch.randn(n_adapters, r, k, generator=gen) / k**0.5).to(dtype)
    lora_b = (torch.randn(n_adapters, n, r, generator=gen) / r**0.5).to(dtype)
    lora_a[1, r // 2 :] = 0  # adapter 1 has a smaller true rank: zero padding must be exact
    lora_b[1, :, r // 2 :] = 0
    scales = torch.tensor([0.5, 2.0, 1.25][:n_adapters])
    bounds = [0]
    for rows, _ in segs:
        bounds.append(bounds[-1] + rows)
    indptr = torch.tensor(bounds, dtype=torch.int32)
    adapter = torch.tensor([s for _, s in segs], dtype=torch.int32)
    return x, weight, bias, lora_a, lora_b, scales, indptr, adapter


def _eps_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # fp32: summation order alone moves results by a few ulps, where torch's own error may be ~0;
    # half types: rounding dominates and the 2x rule carries the test (a quarter ulp of slack).
    ulps = 16 if dtype == torch.float32 else 0.25
    return ulps * torch.finfo(dtype).eps * float(ref.abs().max())


def _assert_close_rule(got: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str):
    err = (got.double() - ref.double()).abs().max().item()
    base = (plain.double() - ref.double()).abs().max().item()
    assert err <= 2 * base + _eps_floor(ref, dtype), f"{what}: kernel err {err:.3g} vs torch {base:.3g} at {dtype}"


def _grads(fn, inputs, gy, leaf_dtype: torch.dtype | None = None):
    """(y, dx, dA, dB); leaves in `leaf_dtype` (float64 for the reference, so its grads are not rounded)."""
    x, weight, bias, lora_a, lora_b, *rest = inputs
    x, lora_a, lora_b = (t.detach().clone().to(leaf_dtype or t.dtype).requires_grad_() for t in (x, lora_a, lora_b))
    y = fn(x, weight, bias, lora_a, lora_b, *rest)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "t", "k", "n", "r", "segs"), CASES)
def test_forward_backward_vs_reference(b, t, k, n, r, segs, dtype):
    inputs = _make(b, t, k, n, r, segs, dtype)
    gy = torch.randn(*inputs[0].shape[:-1], n)
    ref = _grads(lambda *a: lora_segmented_ref(*a, upcast=True), inputs, gy.double(), torch.float64)
    plain = _grads(lambda *a: lora_segmented_ref(*a, upcast=False), inputs, gy)
    got = _grads(lora_segmented, inputs, gy)
    for name, g, p, rf in zip(("y", "dx", "dA", "dB"), got, plain, ref):
        assert g.dtype == dtype and g.shape == rf.shape, name
        assert torch.isfinite(g).all(), name
        _assert_close_rule(g, p, rf, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_fallback_vs_reference(dtype):
    inputs = _make(*CASES[0].values, dtype)
    gy = torch.randn(*inputs[0].shape[:-1], inputs[1].shape[0])
    ref = _grads(lambda *a: lora_segmented_ref(*a, upcast=True), inputs, gy.double(), torch.float64)
    plain = _grads(lambda *a: lora_segmented_ref(*a, upcast=False), inputs, gy)
    got = _grads(lora_segmented_torch, inputs, gy)
    for name, g, p, rf in zip(("y", "dx", "dA", "dB"), got, plain, ref):
        _assert_close_rule(g, p, rf, dtype, name)


@pytest.mark.parametrize("fn", [lora_segmented, lora_segmented_torch], ids=["triton", "torch"])
def test_trainable_slot_gets_the_only_weight_grads(fn):
    inputs = _make(*CASES[0].values, torch.float32)
    gy = torch.randn(*inputs[0].shape[:-1], inputs[1].shape[0])
    _, dx_all, da_all, db_all = _grads(fn, inputs, gy)
    _, dx, da, db = _grads(lambda *a: fn(*a, trainable=2), inputs, gy)
    torch.testing.assert_close(dx, dx_all)
    torch.testing.assert_close(da[2], da_all[2])
    torch.testing.assert_close(db[2], db_all[2])
    assert da[:2].abs().sum() == 0 and db[:2].abs().sum() == 0
    assert da_all[1].abs().sum() > 0  # slot 1 has rows: without `trainable` it does get a gradient
    assert da_all[0].abs().sum() == 0  # slot 0 has only an empty segment


def test_strided_input_like_the_joint_attention_split():
    # diffusers' JointAttnProcessor2_0 calls to_out[0] on hidden_states[:, :S_img]: a non-contiguous view.
    x, weight, bias, lora_a, lora_b, scales, indptr, adapter = _make(*CASES[0].values, torch.float32)
    wide = torch.randn(x.shape[0], x.shape[1] + 4, x.shape[2])
    wide[:, : x.shape[1]] = x
    view = wide[:, : x.shape[1]]
    assert not view.is_contiguous()
    y = lora_segmented(view, weight, bias, lora_a, lora_b, scales, indptr, adapter)
    ref = lora_segmented_ref(x, weight, bias, lora_a, lora_b, scales, indptr, adapter)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_kernels_write_only_adapter_rows():
    x, weight, bias, lora_a, lora_b, scales, indptr, adapter = _make(*CASES[0].values, torch.float32)
    b, t, k = x.shape
    r = lora_a.shape[1]
    slots = torch.repeat_interleave(adapter.long(), (indptr[1:] - indptr[:-1]).long())
    token_has = (slots >= 0).repeat_interleave(t)
    h = torch.full((b * t, r), float("nan"))
    _shrink(x, lora_a, tuple(lora_a.stride()), indptr, adapter, h)
    assert torch.isnan(h[~token_has]).all()
    assert torch.isfinite(h[token_has]).all()
    y = torch.randn(b, t, weight.shape[0])
    before = y.clone()
    _expand(h, lora_b, tuple(lora_b.stride()), scales, indptr, adapter, y)
    untouched = ~(slots >= 0)
    assert torch.equal(y[untouched], before[untouched])
    assert torch.isfinite(y).all() and not torch.equal(y[~untouched], before[~untouched])


def test_all_rows_base_and_empty_batch():
    x, weight, bias, lora_a, lora_b, scales, _, _ = _make(*CASES[0].values, torch.float32)
    indptr = torch.tensor([0, x.shape[0]], dtype=torch.int32)
    adapter = torch.tensor([-1], dtype=torch.int32)
    y = lora_segmented(x, weight, bias, lora_a, lora_b, scales, indptr, adapter)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))
    empty = lora_segmented(x[:0], weight, bias, lora_a, lora_b, scales, torch.zeros(1, dtype=torch.int32),
                           torch.zeros(0, dtype=torch.int32))  # fmt: skip
    assert empty.shape == (0, x.shape[1], weight.shape[0])


def test_refuses_trainable_base_and_bad_shapes():
    x, weight, bias, lora_a, lora_b, scales, indptr, adapter = _make(*CASES[0].values, torch.float32)
    with pytest.raises(ValueError, match="freeze"):
        lora_segmented(x, weight.requires_grad_(), bias, lora_a, lora_b, scales, indptr, adapter)
    with pytest.raises(ValueError, match="shape"):
        lora_segmented(x, weight.detach(), bias, lora_a[:, :, 1:], lora_b, scales, indptr, adapter)


def test_triton_unavailable_without_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not triton_available()
    x, weight, bias, lora_a, lora_b, scales, indptr, adapter = _make(*CASES[0].values, torch.float32)
    y = lora_segmented(x, weight, bias, lora_a, lora_b, scales, indptr, adapter)  # falls back, no crash
    torch.testing.assert_close(y, lora_segmented_torch(x, weight, bias, lora_a, lora_b, scales, indptr, adapter))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sd35_shapes(dtype):
    # One sd35-medium projection (1536 -> 1536) over 5 rows x 1024 tokens, 3 adapters of rank 32.
    segs = [(2, 0), (1, -1), (2, 2)]
    inputs = [t.cuda() for t in _make(5, 1024, 1536, 1536, 32, segs, dtype)]
    gy = torch.randn(5, 1024, 1536, device="cuda")
    ref = _grads(lambda *a: lora_segmented_ref(*a, upcast=True), inputs, gy.double(), torch.float64)
    plain = _grads(lambda *a: lora_segmented_ref(*a, upcast=False), inputs, gy)
    got = _grads(lora_segmented, inputs, gy)
    for name, g, p, rf in zip(("y", "dx", "dA", "dB"), got, plain, ref):
        _assert_close_rule(g, p, rf, dtype, name)


@pytest.mark.cuda
def test_cuda_graph_replays_with_new_segment_metadata():
    """The grid depends on shapes only: one captured launch serves other segmentations copied into the same
    metadata tensors (same segment count and rows; pad with empty segments to keep the count fixed)."""
    segs_a = [(2, 0), (0, 1), (3, -1), (2, 2)]
    segs_b = [(1, 2), (4, 0), (0, -1), (2, 1)]
    dtype = torch.bfloat16
    x, weight, bias, lora_a, lora_b, scales, indptr, adapter = (
        t.cuda() for t in _make(7, 5, 37, 29, 9, segs_a, dtype)
    )
    metas = [(indptr.clone(), adapter.clone())]
    metas.append(tuple(t.cuda() for t in _make(7, 5, 37, 29, 9, segs_b, dtype)[6:]))

    def run():
        return lora_segmented(x, weight, bias, lora_a, lora_b, scales, indptr, adapter)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # compile and warm up outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static = run()
    for ip, ad in metas * 2:
        indptr.copy_(ip)
        adapter.copy_(ad)
        graph.replay()
        ref = lora_segmented_ref(x, weight, bias, lora_a, lora_b, scales, ip, ad, upcast=True)
        plain = lora_segmented_ref(x, weight, bias, lora_a, lora_b, scales, ip, ad, upcast=False)
        _assert_close_rule(static, plain, ref, dtype, f"graph replay, segments {ad.tolist()}")
