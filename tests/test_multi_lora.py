"""Batched multi-field evaluation (engine/models/multi_lora.py) against peft's own adapter switching.

The tiny SD3 preset carries a student and three teachers with different ranks, alphas and target sets; the
query rows mix teachers, CFG fields, the anchor (adapters off), the guided and unguided student, with uneven
segment sizes and a defined field that gets no rows (an empty segment).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from engine import ops
from engine.adapters.lora import STUDENT, AdapterSwitch, LoraSpec, freeze_for_training, lora_layers, random_adapter
from engine.adapters.multi_lora import (
    MultiLoraLinear,
    SegmentBatch,
    install_multi_lora,
    uninstall_multi_lora,
)
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import PRESETS
from engine.fields import Field, PeftFieldEvaluator, student_field
from engine.fields.batched import BatchedFieldEvaluator
from engine.fields.rows import plan_rows

PRESET = PRESETS["tiny"]
OP = "lora_segmented"
V = predict_velocity  # the SD3 family's velocity, what every evaluator calls
FIELDS = [
    student_field(),
    Field("student_cfg", STUDENT, 4.5),
    Field("geneval", "t1", 4.5),
    Field("ocr", "t2", 1.0),
    Field("pick", "t3", 3.0),
    Field("unused", "t2", 2.0),
    Field("anchor", None),
    Field("cfg", None, 2.5),
]
ROWS = ["geneval", "geneval", "anchor", "pick", "student", "cfg", "geneval", "student_cfg", "ocr", "anchor"]
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and scratch buffers start as NaN (kernels/buffers.py): a skipped element cannot pass."""
    monkeypatch.setenv("FLOWOPD_POISON", "1")


def _model(dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**PRESET.transformer)
    random_adapter(model, STUDENT, LoraSpec(rank=4, alpha=8), seed=10)
    random_adapter(model, "t1", LoraSpec(rank=2, alpha=4), seed=11)
    random_adapter(model, "t2", LoraSpec(rank=8, alpha=4), seed=12)
    random_adapter(model, "t3", LoraSpec(rank=4, alpha=16, targets=("to_q", "to_v", "add_k_proj")), seed=13)
    freeze_for_training(model, STUDENT)
    return model.to(dtype)


def _inputs(n: int = len(ROWS), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, SD3Cond, SD3Cond]:
    gen = torch.Generator().manual_seed(seed)
    c, size, dim, L = PRESET.latent_channels, PRESET.latent_size, PRESET.joint_attention_dim, PRESET.text_seq_len
    x = torch.randn(n, c, size, size, generator=gen)
    sigma = torch.rand(n, generator=gen)
    cond = SD3Cond(torch.randn(n, L, dim, generator=gen), torch.randn(n, PRESET.pooled_projection_dim, generator=gen))
    uncond = SD3Cond(torch.randn(1, L, dim, generator=gen), torch.randn(1, PRESET.pooled_projection_dim, generator=gen))
    return x, sigma, cond, uncond


@pytest.fixture
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", request.param)
    return request.param


def _tol(v: torch.Tensor) -> float:
    return 1e-5 * max(1.0, float(v.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_velocities_match_reference(backend):
    model = _model()
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        ref = PeftFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS)
        got = BatchedFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS)
    assert got.shape == ref.shape == x.shape and not got.requires_grad
    torch.testing.assert_close(got, ref, atol=_tol(ref), rtol=1e-5)


def test_velocities_bf16_within_dtype_tolerance():
    model32 = _model()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        exact = PeftFieldEvaluator(model32, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        ref16 = PeftFieldEvaluator(model16, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        got16 = BatchedFieldEvaluator(model16, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
    for i, name in enumerate(ROWS):
        err, base = (got16[i] - exact[i]).abs().max(), (ref16[i] - exact[i]).abs().max()
        assert err <= 2 * base + 1e-2, f"row {i} ({name}): batched bf16 err {err:.3g} vs peft bf16 {base:.3g}"


def test_velocities_match_peft_set_adapter_loop():
    """peft's own switching (diffusers `set_adapter` / `disable_adapters`), one field at a time."""
    model = _model()
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        got = BatchedFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS)
        by_name = {f.name: f for f in FIELDS}
        for i, name in enumerate(ROWS):
            f = by_name[name]
            if f.adapter is None:
                model.disable_adapters()
            else:
                model.enable_adapters()
                model.set_adapter(f.adapter)
            row = slice(i, i + 1)
            v = predict_velocity(model, x[row], sigma[row], cond[row])
            if f.guided:
                vu = predict_velocity(model, x[row], sigma[row], uncond)
                v = vu + f.cfg_scale * (v - vu)
            torch.testing.assert_close(got[row], v, atol=_tol(v), rtol=1e-5, msg=f"row {i} ({name})")
    model.enable_adapters()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("fuse_grad", [False, True], ids=["split", "fused"])
def test_student_gradients_match_peft(backend, fuse_grad):
    model = _model()
    x, sigma, cond, uncond = _inputs()
    weights = torch.randn(x.shape)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(f".{STUDENT}." in n for n in params)

    def grads(evaluator: PeftFieldEvaluator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        v = evaluator.velocities(x, sigma, cond, ROWS)
        (v * weights).sum().backward()
        return v.detach(), {n: p.grad.clone() for n, p in params.items()}

    v_ref, g_ref = grads(PeftFieldEvaluator(model, V, FIELDS, uncond))
    v_got, g_got = grads(BatchedFieldEvaluator(model, V, FIELDS, uncond, fuse_grad=fuse_grad))
    with torch.no_grad():
        assert not BatchedFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).requires_grad
    torch.testing.assert_close(v_got, v_ref, atol=_tol(v_ref), rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_ref.values())
    for n in params:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=1e-5 * float(g_ref[n].abs().max()) + 1e-7, rtol=1e-4)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen parameters got gradients: {frozen[:3]}"


def test_install_keeps_plain_forwards_and_peft_state(tmp_path):
    model = _model()
    x, sigma, cond, uncond = _inputs(3)
    switch = AdapterSwitch(model)
    keys = list(model.state_dict().keys())
    peft_state = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="t2").items()}

    def plain() -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for name in (None, STUDENT, "t1", "t3"):
                with switch.use(name):
                    outs.append(predict_velocity(model, x, sigma, cond))
        return outs

    before = plain()
    state = install_multi_lora(model)
    assert all(isinstance(layer, MultiLoraLinear) and isinstance(layer, LoraLayer) for layer in lora_layers(model))
    assert len(state.layers) == len(lora_layers(model)) and state.slots == [STUDENT, "t1", "t2", "t3"]
    for a, b in zip(before, plain()):
        assert torch.equal(a, b)
    with torch.no_grad():  # the first segmented forward re-points frozen teachers' weights into the stacks
        BatchedFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS[: x.shape[0]])
    layer = state.layers[0]
    assert layer.lora_A["t1"].weight.data_ptr() == layer._mlora_stack.a[1].data_ptr()
    assert layer.lora_B["t2"].weight.data_ptr() == layer._mlora_stack.b[2].data_ptr()  # t2 has the max rank
    assert layer.lora_A[STUDENT].weight.data_ptr() != layer._mlora_stack.a[0].data_ptr()  # trainable: own memory
    for a, b in zip(before, plain()):
        assert torch.equal(a, b)
    assert list(model.state_dict().keys()) == keys
    after = get_peft_model_state_dict(model, adapter_name="t2")
    assert after.keys() == peft_state.keys() and all(torch.equal(after[k], peft_state[k]) for k in after)
    save_file(after, str(tmp_path / "t2.safetensors"))  # shared views stay contiguous: peft/safetensors save works
    uninstall_multi_lora(model)
    assert all(type(layer) is LoraLinear for layer in lora_layers(model))
    assert not hasattr(model, "_flowopd_multi_lora")


def test_stacks_follow_peft_parameters():
    """In-place teacher reloads, optimizer steps on the student and adapters added later are all seen."""
    model = _model()
    x, sigma, cond, uncond = _inputs()
    batched = BatchedFieldEvaluator(model, V, FIELDS, uncond)
    ref = PeftFieldEvaluator(model, V, FIELDS, uncond)
    with torch.no_grad():
        first = batched.velocities(x, sigma, cond, ROWS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    (batched.velocities(x, sigma, cond, ROWS) ** 2).mean().backward()
    opt.step()
    with torch.no_grad():
        for layer in lora_layers(model):
            if "t1" in layer.lora_A:
                layer.lora_A["t1"].weight.mul_(-2.0)
        want = ref.velocities(x, sigma, cond, ROWS)
        got = batched.velocities(x, sigma, cond, ROWS)  # same evaluator: the stacks are updated in place
    assert not torch.allclose(first, want)
    torch.testing.assert_close(got, want, atol=_tol(want), rtol=1e-5)
    random_adapter(model, "t4", LoraSpec(rank=3, alpha=5), seed=14)
    fields = [*FIELDS, Field("late", "t4", 2.0)]
    rows = [*ROWS[:-1], "late"]
    batched, ref = BatchedFieldEvaluator(model, V, fields, uncond), PeftFieldEvaluator(model, V, fields, uncond)
    with torch.no_grad():
        want = ref.velocities(x, sigma, cond, rows)
        got = batched.velocities(x, sigma, cond, rows)
    torch.testing.assert_close(got, want, atol=_tol(want), rtol=1e-5)
    # Same slot count, shifted slots: t2/t3/t4 move down one slot while their weights live in the old stack.
    model.delete_adapters("t1")
    random_adapter(model, "t5", LoraSpec(rank=2, alpha=3), seed=15)
    fields = [f for f in fields if f.adapter != "t1"] + [Field("newest", "t5", 1.5)]
    rows = [r if r != "geneval" else "newest" for r in rows]
    with torch.no_grad():
        want = PeftFieldEvaluator(model, V, fields, uncond).velocities(x, sigma, cond, rows)
        got = BatchedFieldEvaluator(model, V, fields, uncond).velocities(x, sigma, cond, rows)
    torch.testing.assert_close(got, want, atol=_tol(want), rtol=1e-5)


def test_segment_batch_and_row_plan():
    b = SegmentBatch.from_slots([-1, -1, 0, 0, 0, 2], "cpu")
    assert b.seg_indptr.tolist() == [0, 2, 5, 6] and b.seg_adapter.tolist() == [-1, 0, 2]
    assert b.rows == 6 and b.present == {0, 2} and b.seg_indptr.dtype == torch.int32
    padded = SegmentBatch.from_slots([-1, -1, 0, 0, 0, 2], "cpu", pad_to=5)
    assert padded.seg_indptr.tolist() == [0, 2, 5, 6, 6, 6] and padded.seg_adapter.tolist() == [-1, 0, 2, -1, -1]
    empty = SegmentBatch.from_slots([], "cpu")
    assert empty.seg_indptr.tolist() == [0] and empty.seg_adapter.numel() == 0
    state = install_multi_lora(_model())
    by_name = {f.name: f for f in FIELDS}
    plan = plan_rows([by_name[r] for r in ROWS], list(range(len(ROWS))), state.slot)
    guided = sum(by_name[r].guided for r in ROWS)
    assert len(plan.src) == len(ROWS) + guided == len(plan.uncond_pos) + len(plan.cond_pos)
    assert plan.slots == sorted(plan.slots)  # one segment per adapter
    for i, name in enumerate(ROWS):
        assert plan.src[plan.cond_pos[i]] == i and not plan.uncond[plan.cond_pos[i]]
        assert plan.slots[plan.cond_pos[i]] == state.slot(by_name[name].adapter)
        if by_name[name].guided:
            assert plan.src[plan.uncond_pos[i]] == i and plan.uncond[plan.uncond_pos[i]]


def test_cpu_auto_backend_is_torch(monkeypatch):
    monkeypatch.delenv(f"FLOWOPD_BACKEND_{OP.upper()}", raising=False)
    monkeypatch.delenv("FLOWOPD_BACKEND", raising=False)
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    segs = (torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    args = (x, w, None, torch.zeros(1, 2, 8), torch.zeros(1, 4, 2), torch.ones(1), *segs, None)
    assert ops.chosen(OP, *args) == "torch"
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", "triton")
    assert ops.chosen(OP, *args) == "triton"  # interpreter, on request (conftest sets it)


def test_errors_are_loud():
    model = _model()
    x, sigma, cond, uncond = _inputs()
    evaluator = BatchedFieldEvaluator(model, V, FIELDS, uncond)
    with pytest.raises(ValueError, match="field names"):
        evaluator.velocities(x, sigma, cond, ROWS[:-1])
    with pytest.raises(KeyError, match="unknown field"):
        evaluator.velocities(x, sigma, cond, ["nope"] * len(ROWS))
    with pytest.raises(RuntimeError, match="checkpointing"):
        model.enable_gradient_checkpointing()
        BatchedFieldEvaluator(model, V, FIELDS, uncond, fuse_grad=True).velocities(x, sigma, cond, ROWS)
    model.disable_gradient_checkpointing()
    with pytest.raises(ValueError, match="rows"), torch.no_grad():
        with evaluator.state.segments(SegmentBatch.from_slots([0, 1], "cpu")):
            predict_velocity(model, x[:3], sigma[:3], cond[:3])


def test_reference_mode_is_the_parent_loop():
    model = _model()
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        a = BatchedFieldEvaluator(model, V, FIELDS, uncond, reference=True).velocities(x, sigma, cond, ROWS)
        b = PeftFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS)
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("fuse_grad", [False, True], ids=["split", "fused"])
def test_cuda_bf16_velocities_and_grads(fuse_grad):
    model32 = _model().cuda()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    x, sigma, cond, uncond = (t.cuda() if isinstance(t, torch.Tensor) else t.to("cuda") for t in _inputs())
    with torch.no_grad():
        exact = PeftFieldEvaluator(model32, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
        ref = PeftFieldEvaluator(model, V, FIELDS, uncond).velocities(x, sigma, cond, ROWS).double()
    got = BatchedFieldEvaluator(model, V, FIELDS, uncond, fuse_grad=fuse_grad).velocities(x, sigma, cond, ROWS)
    got.float().square().mean().backward()
    err, base = (got.double() - exact).abs().max(), (ref - exact).abs().max()
    assert err <= 2 * base + 1e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
