"""The shipped toy weights load through the engine's loaders and reproduce their recorded eval rows."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engine.adapters.lora import DEFAULT_TARGETS, adapter_names
from engine.worlds.toy.eval import EvalSettings, add_merge, evaluate, sample_images
from engine.worlds.toy.model import EXPERTS, TOY_TRANSFORMER, WEIGHTS_DIR, load_toy
from engine.worlds.toy.world import TASKS, eval_prompts

RECORD = json.loads((WEIGHTS_DIR / "eval.json").read_text())
CHECK = RECORD["check"]
# Rows are bit-reproducible on one machine; across CPUs float rounding can move a sample over a reward
# threshold (a digit read or not), worth 1/len(samples) of a column.
TOL = 0.03


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return load_toy()


def test_shipped_files_and_sizes() -> None:
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 8 * 2**20, f"shipped toy weights are {total / 2**20:.1f} MB"
    assert (WEIGHTS_DIR / "base" / "config.json").is_file()
    assert (WEIGHTS_DIR / "base" / "diffusion_pytorch_model.safetensors").is_file()
    for task in TASKS:
        d = WEIGHTS_DIR / "experts" / task
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        assert (d / "pytorch_lora_weights.safetensors").is_file()


def test_loads_with_expected_architecture(toy) -> None:
    model, encoder = toy
    for key, value in TOY_TRANSFORMER.items():
        got = model.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, tuple) else value), key
    assert set(EXPERTS.values()) <= set(adapter_names(model))
    for name in EXPERTS.values():
        assert set(model.peft_config[name].target_modules) == set(DEFAULT_TARGETS)
    assert (encoder.seq_len, encoder.dim, encoder.pooled_dim) == (
        RECORD["encoder"]["seq_len"], model.config.joint_attention_dim, model.config.pooled_projection_dim)
    assert not any(p.requires_grad for p in model.parameters())


def _check_prompts() -> list[str]:
    return eval_prompts()[:: CHECK["prompt_stride"]]


@pytest.mark.parametrize("row", list(CHECK["rows"]))
def test_reproduces_recorded_rows(toy, row: str) -> None:
    model, encoder = toy
    settings = EvalSettings(**CHECK["settings"])
    if row == "base":
        adapter = None
    elif row in EXPERTS:
        adapter = EXPERTS[row]
    else:
        spec = CHECK["merge"]
        adapter = add_merge(model, row.split("-")[1], list(EXPERTS.values()), spec["rank"], spec["alpha"])
    got = evaluate(model, encoder, adapter, settings, _check_prompts())
    for column, want in CHECK["rows"][row].items():
        assert got[column] == pytest.approx(want, abs=TOL), (row, column, got)


def test_sampling_is_deterministic_and_batch_invariant(toy) -> None:
    model, encoder = toy
    prompts = eval_prompts()[::20]
    a = sample_images(model, encoder, prompts, EvalSettings(samples_per_prompt=2, batch=3), EXPERTS["text"])
    b = sample_images(model, encoder, prompts, EvalSettings(samples_per_prompt=2, batch=64), EXPERTS["text"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = sample_images(model, encoder, prompts, EvalSettings(samples_per_prompt=2, seed=1), EXPERTS["text"])
    assert (a - c).abs().mean() > 0.05


def test_recorded_table_shows_the_conflict() -> None:
    """Each expert clearly beats the base on its task and is worse than the base on another task."""
    rows = RECORD["rows"]
    for task in TASKS:
        own = rows[task][task]["mean"]
        assert own > rows["base"][task]["mean"] + 0.1, task
        others = [t for t in (*TASKS, "quality") if t != task]
        assert any(rows[task][t]["mean"] < rows["base"][t]["mean"] for t in others), task


@pytest.mark.parametrize("victim", ["base/diffusion_pytorch_model.safetensors", "encoder/model.safetensors",
                                    "experts/text/adapter_model.safetensors"])
def test_a_corrupt_shipped_file_is_refused_naming_it(tmp_path, victim: str) -> None:
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, copy)
    f = copy / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a tensor
    f.write_bytes(bytes(data))
    with pytest.raises(Exception, match=re.escape(str(f))):
        load_toy(copy)
