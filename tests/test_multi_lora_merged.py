"""The merged-weight path of the segmented multi-LoRA layers (`kernels.lora_merge_rows`, issue 18): large frozen
segments run as one GEMM against W + s B A and give what the segmented op gives, forward and backward, at the layer
and through the batched field evaluator; in bf16 within 2x of peft's own error. The threshold that pays is measured
on a GPU by bench/test_multi_teacher.py (`merged-segments`)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.adapters.lora import STUDENT
from engine.adapters.multi_lora import MultiLoraLinear, SegmentBatch, install_multi_lora
from engine.fields import PeftFieldEvaluator
from engine.fields.batched import BatchedFieldEvaluator
from engine.transfer import device_ints
from tests.test_multi_lora import FIELDS, ROWS, V, _inputs, _model

TOKENS = 7


@pytest.fixture
def merged_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each `_merged_segments` call took the merged path (True) or found no large segment (False)."""
    calls: list[bool] = []
    real = MultiLoraLinear._merged_segments

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(MultiLoraLinear, "_merged_segments", spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merged_segments_equal_the_segmented_op_forward_and_backward(backend, merged_calls, monkeypatch) -> None:
    """One projection, rows t1 x5 | student x4 | base x3 | t2 x2 | one row outside every segment, 7 tokens each, at
    threshold 14 token rows: t1 (35) and t2 (14) merge, the student stays segmented (it trains), the base rows and
    the trailing row are base rows. y, dx and the student's dA / dB equal the unmerged layer's."""
    monkeypatch.setenv("FLOWOPD_BACKEND_LORA_SEGMENTED", backend)
    model = _model()
    state = install_multi_lora(model, STUDENT)
    layer = model.transformer_blocks[0].attn.to_q
    t1, s, t2 = state.slot("t1"), state.slot(STUDENT), state.slot("t2")
    bounds, slots = (0, 5, 9, 12, 14), (t1, s, -1, t2)
    batch = SegmentBatch(device_ints(bounds, "cpu", torch.int32), device_ints(slots, "cpu", torch.int32), 15,
                         frozenset({t1, s, t2}), bounds, slots)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(15, TOKENS, layer.in_features, generator=gen)
    g = torch.randn(15, TOKENS, layer.out_features, generator=gen)
    student = [layer.lora_A[STUDENT].weight, layer.lora_B[STUDENT].weight]
    results = []
    for merge in (0, 14):
        state.merge_rows = merge
        x = x0.clone().requires_grad_(True)
        with state.segments(batch):
            y = layer(x)
        (y * g).sum().backward()
        with torch.no_grad(), state.segments(batch):
            y_nograd = layer(x0)  # the no-grad path writes straight into one output
        results.append((y.detach(), y_nograd, x.grad, *[p.grad.clone() for p in student]))
        for p in student:
            p.grad = None
    assert merged_calls == [True, True]  # merge = 0 never looks; 14 merged with grad and without
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5 * max(1.0, float(b.abs().max())), rtol=1e-5)
    assert float(results[0][3].abs().sum()) > 0  # the student's rows did produce gradients


@pytest.mark.parametrize("merge", [1, 60])
def test_batched_fields_with_merged_segments_equal_the_segmented_ones(merge, merged_calls) -> None:
    """The tiny model's rows (16 image + 8 text tokens; t1's segment has 6 rows, the others <= 3): threshold 1 merges
    every adapter segment, 60 only t1's image-stream segments (96 token rows; its text segments have 48)."""
    model = _model()
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        ref = BatchedFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS)
        got = BatchedFieldEvaluator(model, V, FIELDS, uncond, merge_rows=merge).velocities(x, sigma, cond, ROWS)
    assert any(merged_calls) and (merge == 1) == all(merged_calls)
    torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def test_merged_segments_in_bf16_within_twice_peft_error() -> None:
    model32 = _model()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        exact = PeftFieldEvaluator(model32, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        ref16 = PeftFieldEvaluator(model16, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        got16 = BatchedFieldEvaluator(model16, V, FIELDS, uncond, merge_rows=1).velocities(x, sigma, cond, ROWS)
    for i, name in enumerate(ROWS):
        err, base = (got16[i].double() - exact[i]).abs().max(), (ref16[i] - exact[i]).abs().max()
        assert err <= 2 * base + 1e-2, f"row {i} ({name}): merged bf16 err {err:.3g} vs peft bf16 {base:.3g}"


@pytest.mark.cuda
def test_cuda_merged_segments_with_the_triton_op_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU the runs between merged segments take the Triton segmented op; bf16 within 2x of peft's error."""
    monkeypatch.setenv("FLOWOPD_BACKEND_LORA_SEGMENTED", "triton")
    model32 = _model().cuda()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x, sigma, cond, uncond = _inputs()
    x, sigma, cond, uncond = x.cuda(), sigma.cuda(), cond.to("cuda"), uncond.to("cuda")
    with torch.no_grad():
        exact = PeftFieldEvaluator(model32, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        ref16 = PeftFieldEvaluator(model16, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        got16 = BatchedFieldEvaluator(model16, V, FIELDS, uncond, merge_rows=60).velocities(x, sigma, cond, ROWS)
    for i, name in enumerate(ROWS):
        err, base = (got16[i].double() - exact[i]).abs().max(), (ref16[i] - exact[i]).abs().max()
        assert err <= 2 * base + 1e-2, f"row {i} ({name}): merged bf16 err {err:.3g} vs peft bf16 {base:.3g}"
