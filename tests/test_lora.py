"""Student/teacher adapters: switching, loading, export round trips, merges."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from engine.adapters.export import export_adapter
from engine.adapters.lora import (
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    STUDENT,
    AdapterError,
    AdapterSwitch,
    LoraSpec,
    adapter_scale,
    add_adapter,
    load_adapter,
    lora_layers,
    random_adapter,
)
from engine.adapters.merge import merge_into_student
from engine.backends import get_backend
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.loading import build_preset
from engine.files import SUMS
from tests.helpers import randomize_student, tiny_inputs, tiny_model


def velocity(model, inputs) -> torch.Tensor:
    x, sigma, cond = inputs
    with torch.no_grad():
        return predict_velocity(model, x, sigma, cond)


def test_switch_keeps_trainability_and_matches_peft_set_adapter() -> None:
    model = tiny_model()
    randomize_student(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{STUDENT}." in n for n in trainable)
    inputs = tiny_inputs()
    switch = AdapterSwitch(model)
    ours = {}
    for name in (None, STUDENT, "t0", "t1"):
        switch.activate(name)
        ours[name] = velocity(model, inputs)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    reference = build_preset("tiny", seed=0)
    ref_base = velocity(reference, inputs)
    torch.testing.assert_close(ours[None], ref_base, rtol=0, atol=0)
    for name in (STUDENT, "t0", "t1"):
        model.set_adapter(name)  # peft's own path
        model.enable_adapters()
        torch.testing.assert_close(ours[name], velocity(model, inputs), rtol=0, atol=0)
        assert not torch.allclose(ours[name], ref_base)
    with pytest.raises(KeyError, match="no adapter named 'ghost'"):
        switch.activate("ghost")


def _fresh_with_base(model) -> torch.nn.Module:
    fresh = build_preset("tiny", seed=0)
    return fresh


def test_export_round_trip_peft_diffusers_and_ours(tmp_path: Path) -> None:
    model = tiny_model()
    randomize_student(model)
    AdapterSwitch(model).activate(STUDENT)
    inputs = tiny_inputs(seed=3)
    expected = velocity(model, inputs)
    out = export_adapter(model, tmp_path / "export", get_backend('sd3'))
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS, SUMS])
    cfg = json.loads((out / PEFT_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and sorted(cfg["target_modules"])[0] == "add_k_proj"
    assert all(k.startswith("base_model.model.") for k in load_file(out / PEFT_WEIGHTS))
    assert all(k.startswith("transformer.") for k in load_file(out / DIFFUSERS_WEIGHTS))

    peft_model = PeftModel.from_pretrained(build_preset("tiny", seed=0), str(out))
    torch.testing.assert_close(velocity(peft_model, inputs), expected, rtol=0, atol=0)

    diffusers_model = build_preset("tiny", seed=0)
    diffusers_model.load_lora_adapter(str(out), weight_name=DIFFUSERS_WEIGHTS, adapter_name="x")
    torch.testing.assert_close(velocity(diffusers_model, inputs), expected, rtol=0, atol=0)

    for path in (out, out / DIFFUSERS_WEIGHTS):
        ours = build_preset("tiny", seed=0)
        load_adapter(ours, "x", path)
        AdapterSwitch(ours).activate("x")
        torch.testing.assert_close(velocity(ours, inputs), expected, rtol=0, atol=0)
        assert adapter_scale(ours, "x") == 2.0


def test_diffusers_file_without_alpha_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    randomize_student(model)
    out = export_adapter(model, tmp_path / "e", get_backend('sd3'))
    state = load_file(out / DIFFUSERS_WEIGHTS)
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))  # no lora_adapter_metadata: alpha unknown
    with pytest.raises(AdapterError, match="no adapter metadata .* set the teacher's `alpha`"):
        load_adapter(build_preset("tiny"), "t", bare)
    m = build_preset("tiny")
    load_adapter(m, "t", bare, alpha=8.0)
    assert adapter_scale(m, "t") == 2.0
    # kohya-style alpha entries are honoured
    kohya = tmp_path / "kohya.safetensors"
    alphas = {k.replace("lora_A.weight", "alpha"): torch.tensor(8.0) for k in state if k.endswith("lora_A.weight")}
    save_file({**state, **alphas}, str(kohya))
    m2 = build_preset("tiny")
    load_adapter(m2, "t", kohya)
    assert adapter_scale(m2, "t") == 2.0


def test_mismatched_adapters_are_refused_with_file_name(tmp_path: Path) -> None:
    model = tiny_model()
    out = export_adapter(model, tmp_path / "e", get_backend('sd3'))
    (out / SUMS).unlink()  # hand-edited adapters below: no checksums, so the structural checks must catch them
    other = build_preset("sd35-medium") if False else None  # noqa: F841 (documentation: same class, other dims)
    # wrong shapes: a model with a different width
    from diffusers import SD3Transformer2DModel

    from engine.backends.sd3.presets import PRESETS

    wide = SD3Transformer2DModel(**{**PRESETS["tiny"].transformer, "num_attention_heads": 3})
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors does not match the model: .*shape"):
        load_adapter(wide, "t", out)
    assert "t" not in getattr(wide, "peft_config", {})  # nothing half-loaded
    # missing keys: drop a module's weights
    state = load_file(out / PEFT_WEIGHTS)
    dropped = {k: v for k, v in state.items() if "transformer_blocks.1." not in k}
    save_file(dropped, str(out / PEFT_WEIGHTS))
    with pytest.raises(AdapterError, match="LoRA weights missing"):
        load_adapter(build_preset("tiny"), "t", out)
    # corrupt file
    (out / PEFT_WEIGHTS).write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterError, match=r"cannot read adapter weights .*adapter_model.safetensors"):
        load_adapter(build_preset("tiny"), "t", out)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(build_preset("tiny"), "t", tmp_path / "nothing.safetensors")


def _delta(model, name, layer) -> torch.Tensor:
    return adapter_scale(model, name) * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()


def test_svd_merge_is_exact_when_rank_suffices() -> None:
    model = build_preset("tiny")
    add_adapter(model, STUDENT, LoraSpec(8, 4.0))
    random_adapter(model, "a", LoraSpec(2, 2.0), seed=1)
    random_adapter(model, "b", LoraSpec(3, 6.0), seed=2)
    merge_into_student(model, ["a", "b"], "svd", [0.25, 0.75])
    for layer in lora_layers(model):
        want = 0.25 * _delta(model, "a", layer) + 0.75 * _delta(model, "b", layer)
        torch.testing.assert_close(_delta(model, STUDENT, layer), want, rtol=1e-5, atol=1e-6)


def test_svd_merge_truncation_is_best_rank_r() -> None:
    model = build_preset("tiny")
    add_adapter(model, STUDENT, LoraSpec(2, 2.0))
    random_adapter(model, "a", LoraSpec(4, 4.0), seed=1)
    random_adapter(model, "b", LoraSpec(4, 4.0), seed=2)
    merge_into_student(model, ["a", "b"], "svd")
    layer = lora_layers(model)[0]
    full = 0.5 * _delta(model, "a", layer) + 0.5 * _delta(model, "b", layer)
    sv = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(_delta(model, STUDENT, layer) - full)
    assert err.item() == pytest.approx(sv[2:].norm().item(), rel=1e-5)  # Eckart-Young optimum


def test_average_merge_matches_reference_code() -> None:
    model = build_preset("tiny")
    add_adapter(model, STUDENT, LoraSpec(4, 8.0))
    random_adapter(model, "a", LoraSpec(4, 8.0), seed=1)
    random_adapter(model, "b", LoraSpec(4, 8.0), seed=2)
    merge_into_student(model, ["a", "b"], "average")
    for layer in lora_layers(model):
        for mod in (layer.lora_A, layer.lora_B):
            torch.testing.assert_close(mod[STUDENT].weight, (mod["a"].weight + mod["b"].weight) / 2)
    with pytest.raises(ValueError, match="rank"):
        random_adapter(model, "c", LoraSpec(2, 2.0), seed=3)
        merge_into_student(model, ["c"], "average")


def test_export_loads_through_the_sd3_pipeline_with_identical_outputs(tmp_path: Path) -> None:
    """`StableDiffusion3Pipeline.load_lora_weights` (the README's usage) takes another path than the model-level
    loader: the pipeline splits the file by component prefix and reads the alpha from the metadata itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = tiny_model()
    randomize_student(model)
    AdapterSwitch(model).activate(STUDENT)
    inputs = tiny_inputs(seed=5)
    expected = velocity(model, inputs)
    out = export_adapter(model, tmp_path / "export", get_backend('sd3'))
    components = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(transformer=build_preset("tiny", seed=0),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **components)
    pipe.load_lora_weights(str(out), weight_name=DIFFUSERS_WEIGHTS, adapter_name="student")
    assert adapter_scale(pipe.transformer, "student") == 2.0  # alpha 8 / rank 4, from the file's metadata
    torch.testing.assert_close(velocity(pipe.transformer, inputs), expected, rtol=0, atol=0)


def test_export_is_readable_like_any_new_file(tmp_path: Path) -> None:
    model = tiny_model()
    mask = 0o027  # e.g. a group-readable cluster setting
    old = os.umask(mask)
    try:
        out = export_adapter(model, tmp_path / "export", get_backend('sd3'))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        name: 0o666 & ~mask for name in (PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS, SUMS)}
