"""The student's side of issue 14: EMA (Flow-GRPO's rule as Flow-OPD calls it), no dead layers after a merged cold
start, full-checkpoint teachers (a second frozen model), DanceOPD's warm start, at tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters.lora import STUDENT, AdapterSwitch, LoraSpec, add_adapter, lora_layers, random_adapter
from engine.adapters.merge import merge_into_student
from engine.backends import get_backend
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.loading import build_preset
from engine.config import load_config
from engine.ema import StudentEMA
from engine.fields.batched import BatchedFieldEvaluator
from engine.fields.evaluator import PeftFieldEvaluator
from engine.fields.field import Field
from engine.student import WARM, build_student
from tests.helpers import tiny_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
FAST = ["rollout.steps=4", "train.steps=4", "train.save_every=2", "rollout.group_size=1"]
ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out")


def run(out: Path, overrides: list[str]):
    from engine.trainer import Trainer

    cfg = load_config(TINY, [*FAST, *overrides, f'output_dir="{out}"'])
    trainer = Trainer(cfg)
    try:
        rows = trainer.train()
    finally:
        trainer.close()
    return trainer, rows


# ------------------------------------------------------------------------------------------------------ EMA


class FlowGrpoEMA:
    """flow_grpo/ema.py EMAModuleWrapper.step / get_current_decay, transcribed (float64)."""

    def __init__(self, params, decay, interval):
        self.ema = [p.detach().double().clone() for p in params]
        self.decay, self.interval = decay, interval

    def step(self, params, optimization_step):
        one_minus_decay = 1 - min((1 + optimization_step) / (10 + optimization_step), self.decay)
        if (optimization_step + 1) % self.interval == 0:
            for e, p in zip(self.ema, params):
                e.add_(one_minus_decay * (p.detach().double() - e))


@pytest.mark.parametrize("accum", [1, 3])
def test_ema_is_flow_opds_per_micro_batch_rule(accum: int) -> None:
    """Flow-OPD's loop (scripts/train_sd3_opd_mix.py:1494-1820): ema.step(params, global_step) after every rollout
    micro-batch; the optimizer steps after each `accum`-th one, then global_step += 1."""
    gen = torch.Generator().manual_seed(0)
    p = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
    ref = FlowGrpoEMA(p, 0.9, 8)
    ours = StudentEMA(p, 0.9, 8, repeats=accum)
    global_step = 0
    for _ in range(40):  # optimizer steps
        for i in range(accum):
            if i == accum - 1:  # the last micro-batch's backward syncs: optimizer step, then global_step += 1
                with torch.no_grad():
                    for q in p:
                        q.add_(torch.randn(q.shape, generator=gen))
                global_step += 1
                ours.update(global_step)
            ref.step(p, global_step)
    # the reference's last A - 1 calls of a step happen in the next step (same weights, same count): run them
    for _ in range(accum - 1):
        ref.step(p, global_step)
    for a, b in zip(ours.shadow, ref.ema):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    assert ours.update(7) and not ours.update(8)  # (n + 1) % 8 == 0


def test_ema_is_exported_checkpointed_and_resumed_exactly(tmp_path: Path) -> None:
    ema = ["train.ema_decay=0.5", "train.ema_every=1"]
    trainer, _ = run(tmp_path / "full", ema)
    shadow = trainer.ema.shadow
    live = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    exported = load_file(tmp_path / "full" / "export" / "adapter_model.safetensors")
    with trainer.ema.applied():
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if f".{STUDENT}." in k}
    for key, value in exported.items():
        name = key.removeprefix("base_model.model.").replace(".weight", f".{STUDENT}.weight")
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert any(not torch.equal(s, q.float()) for s, q in zip(shadow, live))  # the export is not the live student
    run(tmp_path / "split", [*ema, "train.steps=2"])
    resumed, _ = run(tmp_path / "split", ema)
    assert resumed.start_step == 2
    a = (tmp_path / "full" / "export" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "split" / "export" / "adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------- dead layers


def _merged_model(method: str, student_rank: int = 4) -> torch.nn.Module:
    model = build_preset("tiny", seed=0)
    torch.manual_seed(0)
    add_adapter(model, STUDENT, LoraSpec(student_rank, 2.0 * student_rank))  # targets include attn2.*
    for i in range(2):  # Flow-GRPO-style teachers: attn.* and the context projections only
        random_adapter(model, f"t{i}", LoraSpec(4, 4.0, ATTN), seed=10 + i)
    assert merge_into_student(model, ["t0", "t1"], method) == 4  # attn2.{to_q,to_k,to_v,to_out.0} of block 0
    return model


@pytest.mark.parametrize("method", ["svd", "average"])
def test_layers_no_teacher_covers_keep_their_init_and_train(method: str) -> None:
    model = _merged_model(method)
    uncovered = [layer for layer in lora_layers(model) if "t0" not in layer.lora_A]
    assert len(uncovered) == 4
    for layer in uncovered:
        assert layer.lora_A[STUDENT].weight.abs().sum() > 0 and layer.lora_B[STUDENT].weight.abs().sum() == 0
    AdapterSwitch(model).activate(STUDENT)
    model.requires_grad_(False)
    for layer in uncovered:
        layer.lora_B[STUDENT].weight.requires_grad_(True)
    predict_velocity(model, *tiny_inputs(b=2)).square().mean().backward()
    assert all(layer.lora_B[STUDENT].weight.grad.abs().sum() > 0 for layer in uncovered)  # A != 0: B trains


def test_svd_merge_leaves_unused_rank_at_the_init() -> None:
    """Two rank-4 teachers (delta rank 8) into rank 12: 4 rank directions keep A's init with B = 0."""
    model = _merged_model("svd", student_rank=12)
    layer = next(layer for layer in lora_layers(model) if "t0" in layer.lora_A)
    a, b = layer.lora_A[STUDENT].weight, layer.lora_B[STUDENT].weight
    assert (a[8:].abs().sum(1) > 0).all() and b[:, 8:].abs().max() == 0
    s = 24.0 / 12
    delta = sum(0.5 * layer.lora_B[t].weight.double() @ layer.lora_A[t].weight.double() for t in ("t0", "t1"))
    torch.testing.assert_close(s * b.double() @ a.double(), delta, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- full-checkpoint teacher


@pytest.fixture(scope="module")
def full_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("realism") / "transformer"
    build_preset("tiny", seed=5).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("batched", [False, True])
def test_a_full_checkpoint_teacher_is_its_own_model_in_both_evaluators(full_teacher: Path, batched: bool) -> None:
    backend = get_backend("sd3")
    full, _ = backend.load(full_teacher, torch.float32)
    full.requires_grad_(False)
    model = build_preset("tiny", seed=0)
    random_adapter(model, "t0", LoraSpec(4, 4.0), seed=3)
    add_adapter(model, STUDENT, LoraSpec(4, 8.0))
    x, sigma, cond = tiny_inputs(b=4)
    uncond = cond[:1]
    fields = [Field("realism", "realism", 1.0), Field("realism_cfg", "realism", 2.0), Field("t", "t0", 1.0)]
    cls = BatchedFieldEvaluator if batched else PeftFieldEvaluator
    ev = cls(model, predict_velocity, fields, uncond, models={"realism": full})
    rows = ["realism", "t", "realism_cfg", "realism"]
    with torch.no_grad():
        v = ev.velocities(x, sigma, cond, rows)
        v_full = predict_velocity(full, x, sigma, cond)
        v_full_u = predict_velocity(full, x, sigma, type(cond).cat([uncond] * 4))
        AdapterSwitch(model).activate("t0")
        v_t = predict_velocity(model, x, sigma, cond)
    for i in (0, 3):
        torch.testing.assert_close(v[i], v_full[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[1], v_t[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[2], v_full_u[2] + 2.0 * (v_full[2] - v_full_u[2]), rtol=1e-5, atol=1e-5)


def test_training_with_a_full_checkpoint_teacher(tmp_path: Path, full_teacher: Path) -> None:
    trainer, rows = run(tmp_path / "r", [
        f"teachers.2={{name='realism', path='{full_teacher}'}}", "fields.3={name='realism', source='realism'}",
        "opd.routes={compose='realism', text='text'}", "init.teachers=['compose_expert', 'text_expert']",
        "train.steps=2", "train.save_every=0"])
    assert set(trainer.full_teachers) == {"realism"} and "realism" not in trainer.model.peft_config
    assert all(r["skipped"] is False and r["loss"] > 0 for r in rows) and "field/realism" in rows[0]
    fresh = build_preset("tiny", seed=5).state_dict()
    for k, v in trainer.full_teachers["realism"].state_dict().items():
        assert torch.equal(v, fresh[k]), k  # frozen


# ----------------------------------------------------------------------------------------------- warm start


def test_warm_start_merges_under_the_student_and_keeps_the_other_fields_clean(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["init.warm_start=true", "init.merge='svd'"])
    model, _ = build_student(cfg, get_backend("sd3"))
    assert model.peft_config[WARM].r == 8  # exact: the two rank-4 teachers' mean delta at rank 4 + 4
    for layer in lora_layers(model):
        if STUDENT in layer.lora_B:
            assert layer.lora_B[STUDENT].weight.abs().max() == 0  # a fresh student LoRA
    x, sigma, cond = tiny_inputs(b=2)
    switch = AdapterSwitch(model)
    ref = load_config(TINY, ["init.merge='none'"])
    clean, _ = build_student(ref, get_backend("sd3"))  # the same teachers, nothing merged
    ref_switch = AdapterSwitch(clean)
    with torch.no_grad():
        for name in (None, "compose_expert"):  # the base field and a teacher see the clean base
            switch.activate(name)
            ref_switch.activate(name)
            torch.testing.assert_close(predict_velocity(model, x, sigma, cond), predict_velocity(clean, x, sigma, cond))
        switch.activate(STUDENT)
        v_student = predict_velocity(model, x, sigma, cond)
        switch.activate(WARM)
        torch.testing.assert_close(v_student, predict_velocity(model, x, sigma, cond))  # student = base + warm start
        for layer in lora_layers(model):  # ... = base + the mean of the teachers' deltas
            if WARM in layer.lora_A:  # WARM's scale alpha / r = 1; the stand-in teachers' 4 / 4 = 1 too
                delta = layer.lora_B[WARM].weight.double() @ layer.lora_A[WARM].weight.double()
                mean = sum(0.5 * layer.lora_B[t].weight.double() @ layer.lora_A[t].weight.double()
                           for t in ("compose_expert", "text_expert"))
                torch.testing.assert_close(delta, mean, rtol=1e-5, atol=1e-7)  # float32 storage of the factors


@pytest.mark.parametrize("fast", [[], ["opd.evaluator='batched'", "model.attention='fused'"]],
                         ids=["reference", "batched_fused"])
def test_warm_started_student_exports_as_one_adapter_on_the_clean_base(tmp_path: Path, fast: list[str]) -> None:
    trainer, rows = run(tmp_path / "w", ["init.warm_start=true", "init.merge='svd'", "train.steps=2",
                                         "train.save_every=0", "train.lr=3e-3", *fast])
    model = trainer.model
    x, sigma, cond = tiny_inputs(b=3, seed=4)
    AdapterSwitch(model).activate(STUDENT)
    with torch.no_grad():
        live = predict_velocity(model, x, sigma, cond)
        base = build_preset("tiny", seed=0)
        base.load_lora_adapter(str(tmp_path / "w" / "export"), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name="s")
        torch.testing.assert_close(predict_velocity(base, x, sigma, cond), live, rtol=1e-5, atol=1e-6)
    assert any(layer.lora_B[STUDENT].weight.abs().max() > 0 for layer in lora_layers(model) if STUDENT in layer.lora_B)
    assert all(not p.requires_grad for layer in lora_layers(model) if WARM in layer.lora_A
               for p in layer.lora_A[WARM].parameters())


# ------------------------------------------------------------------------------------- gradient diagnostic


def test_gradient_diagnostic_leaves_training_unchanged(tmp_path: Path) -> None:
    """autograd.grad of the two parts must not reach DeepSpeed's gradient buffers: same loss and grad norm."""
    common = ["opd.loss='kl_only'", "train.steps=3", "train.save_every=0"]
    _, plain = run(tmp_path / "plain", common)
    _, diag = run(tmp_path / "diag", [*common, "opd.grad_diagnostic=2"])
    for a, b in zip(plain, diag):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    assert {"grad/pathwise", "grad/score", "grad/cos"} <= set(diag[0]) and "grad/cos" not in diag[1]
    assert diag[0]["grad/pathwise"] > 0 and diag[0]["grad/score"] > 0
