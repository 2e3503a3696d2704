"""FusedJointAttnProcessor vs diffusers' JointAttnProcessor2_0 + peft LoRA, on tiny SD3 transformers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import RMSNorm

from engine.adapters.lora import STUDENT, AdapterSwitch, LoraSpec, freeze_for_training, random_adapter
from engine.backends.sd3 import attention as fa
from engine.backends.sd3 import sdpa
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import get_preset

# the preset: qk RMSNorm, dual attention in layer 0, context-pre-only last block; and a plain variant
CONFIGS = {
    "qknorm-dual": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
    "plain": dict(qk_norm=None, dual_attention_layers=()),
}
# adapter states the engine switches between: one adapter, another, the base, and two at once (peft sums them)
STATES = [STUDENT, "t1", None, [STUDENT, "t2"]]


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs and scratch buffers start as NaN (kernels/buffers.py): a skipped element cannot pass."""
    monkeypatch.setenv("FLOWOPD_POISON", "1")


def build(config: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> SD3Transformer2DModel:
    kwargs = dict(get_preset("tiny").transformer)
    kwargs.update(CONFIGS[config])
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**kwargs)
    with torch.no_grad():
        for m in model.modules():  # non-trivial norm weights, so that a dropped weight would show
            if isinstance(m, RMSNorm) and m.weight is not None:
                m.weight.normal_(1.0, 0.3)
    random_adapter(model, STUDENT, LoraSpec(rank=4, alpha=8), seed=1)
    random_adapter(model, "t1", LoraSpec(rank=2, alpha=3), seed=2)
    # a teacher on some projections only: to_k, add_q/add_v, to_add_out have no t2 LoRA
    random_adapter(model, "t2", LoraSpec(rank=4, alpha=4, targets=("to_q", "to_v", "add_k_proj", "to_out.0")), seed=3)
    freeze_for_training(model)
    return model.to(dtype)


def activate(model: torch.nn.Module, state: str | list[str] | None) -> None:
    if isinstance(state, list):  # several active adapters: peft's own per-layer state, as set_adapter would set it
        for layer in AdapterSwitch(model).layers:
            layer._disable_adapters = False
            layer._active_adapter = list(state)
    else:
        AdapterSwitch(model).activate(state)


def inputs(dtype: torch.dtype = torch.float32, batch: int = 2):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    cond = SD3Cond(torch.randn(batch, 8, 32, generator=g), torch.randn(batch, 32, generator=g))
    sigma = torch.tensor([0.9, 0.3])[:batch]
    return x.to(dtype), sigma, cond.to(dtype=dtype)


def pair(config: str, dtype: torch.dtype = torch.float32):
    ref = build(config, dtype)
    ours = copy.deepcopy(ref)
    assert fa.install_fused_attention(ours) == (3 if "dual" in config else 2)
    return ref, ours


def student_params(model):
    return [p for n, p in model.named_parameters() if f".{STUDENT}." in n]


def forward_backward(model, x, sigma, cond, want_grad: bool):
    x = x.clone().requires_grad_(want_grad)
    v = predict_velocity(model, x, sigma, cond)
    if not want_grad:
        return v.detach(), []
    w = torch.linspace(-1, 1, v.numel(), dtype=torch.float64).reshape(v.shape)
    loss = (v.double() * w).sum() + v.double().square().sum()
    wrt = [x, *student_params(model)]
    return v.detach(), [g.detach() for g in torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_model_matches_reference_fp32(config):
    ref, ours = pair(config)
    x, sigma, cond = inputs()
    for state in STATES:
        activate(ref, state)
        activate(ours, state)
        want_grad = state == STUDENT
        v_ref, g_ref = forward_backward(ref, x, sigma, cond, want_grad)
        v, g = forward_backward(ours, x, sigma, cond, want_grad)
        torch.testing.assert_close(v, v_ref, atol=2e-6, rtol=1e-5, msg=f"state {state}")
        for a, b in zip(g, g_ref):
            # fp32 gradients are sums over every token: absolute error scales with the gradient's magnitude
            # (measured ~7e-7 x max|grad| between BLAS thread layouts)
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, atol=2e-6 * scale, rtol=1e-5, msg=f"grads, state {state}")
        if want_grad:
            names = ["x"] + [n for n, q in ours.named_parameters() if f".{STUDENT}." in n]
            assert len(g) == len(names) > 1
            # only the last block's text queries are dead: its text outputs are discarded (context-pre-only)
            zero = {n for n, gr in zip(names, g) if gr.abs().sum() == 0}
            last = len(ours.transformer_blocks) - 1
            assert zero == {n for n in names if n.startswith(f"transformer_blocks.{last}.attn.add_q_proj")}
    # states really differ (the comparison above is not of identical functions)
    outs = []
    for state in STATES:
        activate(ours, state)
        outs.append(predict_velocity(ours, x, sigma, cond).detach())
    assert all((outs[i] - outs[j]).abs().max() > 1e-3 for i in range(4) for j in range(i))


def test_frozen_parameters_get_no_grad():
    _, ours = pair("qknorm-dual")
    activate(ours, STUDENT)
    x, sigma, cond = inputs()
    predict_velocity(ours, x, sigma, cond).square().mean().backward()
    for name, p in ours.named_parameters():
        if f".{STUDENT}." in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_model_bf16_within_dtype_tolerance():
    """bf16: ours may be at most ~2x as far from the float64 model as diffusers + peft in bf16."""
    ref, ours = pair("qknorm-dual", torch.bfloat16)
    gold = copy.deepcopy(ref).to(torch.float64)
    x, sigma, cond = inputs()
    for state in (STUDENT, None):
        for m in (ref, ours, gold):
            activate(m, state)
        want = state == STUDENT
        v_ref, g_ref = forward_backward(ref, x.bfloat16(), sigma, cond.to(dtype=torch.bfloat16), want)
        v, g = forward_backward(ours, x.bfloat16(), sigma, cond.to(dtype=torch.bfloat16), want)
        v_gold, g_gold = forward_backward(gold, x.double(), sigma, cond.to(dtype=torch.float64), want)
        assert _err(v, v_gold) <= 2 * _err(v_ref, v_gold) + 1e-3, (_err(v, v_gold), _err(v_ref, v_gold))
        for a, b, c in zip(g, g_ref, g_gold):
            floor = 1e-2 * c.abs().max().item()
            assert _err(a, c) <= 2 * _err(b, c) + floor, (_err(a, c), _err(b, c))


@pytest.mark.parametrize("which", ["joint", "dual-attn2", "context-pre-only"])
def test_processor_level(which):
    """Each kind of attention module on its own: outputs (both streams) and grads of inputs and student LoRA."""
    model = build("qknorm-dual")
    activate(model, [STUDENT, "t1"])
    block = model.transformer_blocks[0 if which != "context-pre-only" else -1]
    attn = block.attn2 if which == "dual-attn2" else block.attn
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 11, 32, generator=g, requires_grad=True)
    enc = None if which == "dual-attn2" else torch.randn(2, 5, 32, generator=g, requires_grad=True)
    params = [p for n, p in attn.named_parameters() if f".{STUDENT}." in n] + [
        p for n, p in attn.named_parameters() if ".t1." in n
    ]
    for p in params:
        p.requires_grad_(True)  # teacher t1 trainable here too, to check grads of two active adapters

    def run(proc):
        attn.set_processor(proc)
        out = attn(hidden_states=hs, encoder_hidden_states=enc)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.cos(torch.arange(o.numel()).reshape(o.shape) * 0.37)).sum() for o in outs)
        wrt = [hs] + ([enc] if enc is not None else []) + params
        return [o.detach() for o in outs], torch.autograd.grad(loss, wrt)

    outs_ref, g_ref = run(JointAttnProcessor2_0())
    outs, g = run(fa.FusedJointAttnProcessor())
    assert len(outs) == len(outs_ref) == (1 if enc is None else 2)
    if which == "context-pre-only":
        assert attn.to_add_out is None  # the text part comes back unprojected
    for a, b in zip(outs + list(g), outs_ref + list(g_ref)):
        # fp32 sums over tokens: absolute error scales with magnitude and the BLAS thread layout
        torch.testing.assert_close(a, b, atol=2e-6 * max(1.0, b.abs().max().item()), rtol=1e-5)


def test_trainable_base_and_norm_weights_get_reference_grads():
    """Not the OPD setting, but if the base or the norms train, their grads must be right too."""
    model = build("qknorm-dual")
    attn = model.transformer_blocks[0].attn
    trainable = [attn.to_q.base_layer.weight, attn.add_v_proj.base_layer.bias, attn.norm_k.weight]
    for p in trainable:
        p.requires_grad_(True)
    hs = torch.randn(2, 7, 32)
    enc = torch.randn(2, 3, 32)
    grads = []
    for proc in (JointAttnProcessor2_0(), fa.FusedJointAttnProcessor()):
        attn.set_processor(proc)
        a, b = attn(hidden_states=hs, encoder_hidden_states=enc)
        grads.append(torch.autograd.grad(a.square().sum() + b.sum(), trainable))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_params_in_fp32_on_a_bf16_base():
    """diffusers training scripts keep trainable LoRA params in fp32 on a bf16 base (cast_training_params)."""
    model = build("qknorm-dual", torch.bfloat16)
    for p in student_params(model):
        p.data = p.data.float()
        p.requires_grad_(True)
    activate(model, STUDENT)
    attn = model.transformer_blocks[0].attn
    gold = copy.deepcopy(attn).double()
    hs, enc = torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    res = {}
    for name, mod, proc, dt in (
        ("ref", attn, JointAttnProcessor2_0(), torch.bfloat16),
        ("ours", attn, fa.FusedJointAttnProcessor(), torch.bfloat16),
        ("gold", gold, JointAttnProcessor2_0(), torch.float64),
    ):
        mod.set_processor(proc)
        a, b = mod(hidden_states=hs.to(dt), encoder_hidden_states=enc.to(dt))
        params = [p for n, p in mod.named_parameters() if f".{STUDENT}." in n]
        grads = torch.autograd.grad(a.double().square().sum() + b.double().sum(), params)
        res[name] = (a.detach(), b.detach(), *grads)
    assert all(g.dtype == torch.float32 for g in res["ours"][2:])
    for o, r, g in zip(res["ours"], res["ref"], res["gold"]):
        assert _err(o, g) <= 2 * _err(r, g) + 1e-2 * g.abs().max().item(), (_err(o, g), _err(r, g))


def test_base_weight_cache_follows_weight_changes():
    ref, ours = pair("qknorm-dual")
    activate(ref, None)
    activate(ours, None)
    x, sigma, cond = inputs()
    predict_velocity(ours, x, sigma, cond)  # fills the cache
    for m in (ref, ours):
        with torch.no_grad():
            m.transformer_blocks[0].attn.to_k.base_layer.weight.mul_(1.5)  # in place: bumps _version
            layer = m.transformer_blocks[1].attn.add_v_proj.base_layer
            layer.weight = torch.nn.Parameter(layer.weight * -1.0, requires_grad=False)  # new tensor: data_ptr
    torch.testing.assert_close(
        predict_velocity(ours, x, sigma, cond), predict_velocity(ref, x, sigma, cond), atol=2e-6, rtol=1e-5
    )


def test_unsupported_cases_fall_back_to_the_reference(caplog):
    model = build("qknorm-dual")
    activate(model, STUDENT)
    attn = model.transformer_blocks[0].attn
    hs, enc = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    mask = torch.zeros(2, 1, 9, 9)
    mask[..., -1] = float("-inf")
    attn.to_v.lora_dropout[STUDENT] = torch.nn.Dropout(0.5)
    attn.train()
    outs = []
    for proc in (JointAttnProcessor2_0(), fa.FusedJointAttnProcessor()):
        attn.set_processor(proc)
        with caplog.at_level(logging.WARNING):
            torch.manual_seed(7)
            outs.append(attn(hidden_states=hs, encoder_hidden_states=enc, attention_mask=mask))
            torch.manual_seed(8)
            outs.append(attn(hidden_states=hs, encoder_hidden_states=enc))
    for a, b in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert "attention_mask" in caplog.text and "LoRA dropout" in caplog.text


def test_install_uninstall_and_dispatch(monkeypatch):
    model = build("qknorm-dual")
    procs = lambda: [type(m.processor) for m in fa._joint_attention_modules(model)]  # noqa: E731
    assert procs() == [JointAttnProcessor2_0] * 3
    assert fa.install_attention(model) == 3  # auto: fused
    assert procs() == [fa.FusedJointAttnProcessor] * 3
    monkeypatch.setenv("FLOWOPD_BACKEND_JOINT_ATTENTION", "torch")
    assert fa.install_attention(model) == 3
    assert procs() == [JointAttnProcessor2_0] * 3
    monkeypatch.delenv("FLOWOPD_BACKEND_JOINT_ATTENTION")
    fa.install_fused_attention(model, backend="xformers")
    assert {m.processor.backend for m in fa._joint_attention_modules(model)} == {"xformers"}
    x, sigma, cond = inputs()
    predict_velocity(model, x, sigma, cond)
    assert fa.uninstall_fused_attention(model) == 3
    assert procs() == [JointAttnProcessor2_0] * 3
    assert not any(fa._CACHE_ATTR in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="unknown attention backend"):
        fa.install_fused_attention(model, backend="ring")


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_attention_backend_falls_back_to_sdpa_where_unusable(backend, caplog, monkeypatch):
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))
    if sdpa.attention_backend_usable(backend, q):
        pytest.skip(f"{backend} runs here")
    monkeypatch.setattr(sdpa, "_WARNED", set())  # an earlier test may have logged this fallback already
    with caplog.at_level(logging.WARNING):
        out = sdpa.attention_bshd(q, k, v, backend)
        sdpa.attention_bshd(q, k, v, backend)
    assert sum(f"backend {backend!r} not usable" in r.getMessage() for r in caplog.records) == 1, caplog.text
    torch.testing.assert_close(out, sdpa.attention_bshd(q, k, v, "sdpa"))
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, -1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", ref, v), atol=1e-5, rtol=1e-5)


def test_student_training_step_matches_reference():
    """Two DanceOPD-style steps (teacher target, student MSE, clip, AdamW) with either processor."""
    ref, ours = pair("qknorm-dual")
    x, sigma, cond = inputs()
    results = []
    for model in (ref, ours):
        params = student_params(model)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
        switch = AdapterSwitch(model)
        losses = []
        for step in range(2):
            xs = x + 0.1 * step
            with torch.no_grad(), switch.use("t1"):
                target = predict_velocity(model, xs, sigma, cond)
            switch.activate(STUDENT)
            loss = torch.nn.functional.mse_loss(predict_velocity(model, xs, sigma, cond), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in params]))
    (loss_ref, p_ref), (loss, p) = results
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    moved = 0
    for a, b, p0 in zip(p, p_ref, student_params(build("qknorm-dual"))):
        torch.testing.assert_close(a, b, atol=2e-6 * max(1.0, b.abs().max().item()), rtol=1e-5)
        moved += int(not torch.equal(a, p0))
    assert moved == len(p)  # every student tensor was updated


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(sdpa.ATTENTION_BACKENDS))
def test_cuda_bf16_each_backend(backend):
    ref, ours = pair("qknorm-dual", torch.bfloat16)
    gold = copy.deepcopy(ref).double().cuda()
    ref, ours = ref.cuda(), ours.cuda()
    fa.install_fused_attention(ours, backend=backend)
    x, sigma, cond = inputs()
    if backend != "sdpa" and not sdpa.attention_backend_usable(backend, torch.empty(1, 1, 1, 16).cuda().bfloat16()):
        pytest.skip(f"{backend} not importable")
    for m in (ref, ours, gold):
        activate(m, STUDENT)
    dev = dict(device="cuda")
    v_ref, g_ref = forward_backward(ref, x.bfloat16().cuda(), sigma.cuda(), cond.to(dtype=torch.bfloat16, **dev), True)
    v, g = forward_backward(ours, x.bfloat16().cuda(), sigma.cuda(), cond.to(dtype=torch.bfloat16, **dev), True)
    v_gold, g_gold = forward_backward(gold, x.double().cuda(), sigma.cuda(), cond.to(dtype=torch.float64, **dev), True)
    assert _err(v, v_gold) <= 2 * _err(v_ref, v_gold) + 1e-3
    for a, b, c in zip(g, g_ref, g_gold):
        assert _err(a, c) <= 2 * _err(b, c) + 1e-2 * c.abs().max().item()


def test_trainer_installs_fused_attention_through_the_dispatch_op(monkeypatch):
    """`model.attention = "fused"` installs the fused processor unless the documented env override
    (FLOWOPD_BACKEND_JOINT_ATTENTION=torch, or FLOWOPD_BACKEND=torch) gives diffusers' processor back."""
    from engine.backends import get_backend
    from engine.config import load_config
    from engine.student import build_student

    for var in ("FLOWOPD_BACKEND", "FLOWOPD_BACKEND_JOINT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    config = load_config(None, ["model.attention='fused'"])
    for var, want in ((None, fa.FusedJointAttnProcessor), ("FLOWOPD_BACKEND_JOINT_ATTENTION", JointAttnProcessor2_0),
                      ("FLOWOPD_BACKEND", JointAttnProcessor2_0)):  # fmt: skip
        if var is not None:
            monkeypatch.setenv(var, "torch")
        model, _ = build_student(config, get_backend(config.model.family))
        assert {type(m.processor) for m in fa._joint_attention_modules(model)} == {want}, var
        monkeypatch.delenv(var or "FLOWOPD_BACKEND", raising=False)
