"""Bad teacher adapters and shipped base weights are refused with a message naming the file, never silently
mis-loaded: wrong rank, target modules, shapes or base model, NaN/Inf, truncation, bit rot, missing alpha."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.adapters.export import export_adapter
from engine.adapters.lora import (
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterError,
    adapter_names,
    adapter_scale,
    load_adapter,
)
from engine.backends import get_backend
from engine.backends.sd3.loading import ModelLoadError, build_preset, load_transformer
from engine.backends.sd3.presets import PRESETS
from engine.files import SUMS, write_sha256sums
from engine.train import main
from tests.helpers import randomize_student, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A good exported adapter (PEFT dir + diffusers file + SHA256SUMS) of the tiny preset, rank 4."""
    model = tiny_model()
    randomize_student(model)
    return export_adapter(model, tmp_path / "adapter", get_backend('sd3'))


def refused(path: Path, match: str, model: torch.nn.Module | None = None, **kw) -> None:
    model = model if model is not None else build_preset("tiny")
    with pytest.raises(AdapterError, match=match):
        load_adapter(model, "t", path, **kw)
    assert "t" not in adapter_names(model)  # nothing half-loaded


def edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / PEFT_CONFIG).read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (adapter / PEFT_CONFIG).write_text(json.dumps(cfg))


def test_good_adapter_loads(adapter: Path) -> None:
    model = build_preset("tiny")
    load_adapter(model, "t", adapter)
    assert adapter_scale(model, "t") == 2.0


def test_edited_files_fail_their_checksum(adapter: Path) -> None:
    edit_config(adapter, r=8)
    refused(adapter, rf"{adapter / PEFT_CONFIG} is corrupt: its sha256 differs from .*{SUMS}")
    data = bytearray((adapter / DIFFUSERS_WEIGHTS).read_bytes())
    data[-5] ^= 0x10  # one bit in a tensor's data: safetensors itself cannot see it
    (adapter / DIFFUSERS_WEIGHTS).write_bytes(bytes(data))
    refused(adapter / DIFFUSERS_WEIGHTS, rf"{adapter / DIFFUSERS_WEIGHTS} is corrupt")


def test_wrong_rank_in_config_is_a_shape_error(adapter: Path) -> None:
    (adapter / SUMS).unlink()
    edit_config(adapter, r=8)
    refused(adapter, rf"adapter {adapter / PEFT_WEIGHTS} does not match the model: .*shape \(4, .*\) != model "
                     rf"\(8, .*\) \(adapter rank 8 from its config\)")


def test_wrong_target_modules(adapter: Path) -> None:
    (adapter / SUMS).unlink()
    edit_config(adapter, target_modules=["no_such_proj"])
    refused(adapter, rf"{adapter / PEFT_WEIGHTS}: does not fit this model")
    edit_config(adapter, target_modules=["to_q", "no_such_proj"])  # config and weights disagree
    refused(adapter, r"31 weights match no module of this model|weights match no module")
    edit_config(adapter, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                         "add_v_proj", "to_add_out", "ff.net.0.proj"])
    refused(adapter, r"LoRA weights missing \(e\.g\. \[.*ff\.net\.0\.proj")


def test_adapter_of_another_base_model(tmp_path: Path) -> None:
    deeper = build_preset(type(PRESETS["tiny"])("deep", {**PRESETS["tiny"].transformer, "num_layers": 3}, 8, 8))
    from engine.adapters.lora import STUDENT, LoraSpec, add_adapter

    add_adapter(deeper, STUDENT, LoraSpec(4, 8.0))
    out = export_adapter(deeper, tmp_path / "deep", get_backend('sd3'))
    # the deeper model's last block is not context-pre-only, its block 2 does not exist here: 16 stray weights
    refused(out, r"16 weights match no module of this model \(e\.g\. \['transformer_blocks\.1\.attn\.to_add_out")
    wide = type(PRESETS["tiny"])("wide", {**PRESETS["tiny"].transformer, "num_attention_heads": 3}, 8, 8)
    refused(out, "does not match the model", model=build_preset(wide))


def test_nonfinite_adapter_weights(adapter: Path) -> None:
    for name in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS):
        state = load_file(adapter / name)
        key = sorted(k for k in state if "lora_B" in k)[3]
        state[key][0, 0] = float("nan")
        with safe_open(str(adapter / name), framework="pt") as f:
            metadata = f.metadata()
        save_file(state, str(adapter / name), metadata=metadata)
    (adapter / SUMS).unlink()
    refused(adapter, rf"adapter {adapter / PEFT_WEIGHTS} does not match the model: 1 tensors hold NaN/Inf")
    refused(adapter / DIFFUSERS_WEIGHTS, rf"{adapter / DIFFUSERS_WEIGHTS} does not match the model: 1 tensors hold")


def test_truncated_adapter(adapter: Path) -> None:
    data = (adapter / PEFT_WEIGHTS).read_bytes()
    (adapter / PEFT_WEIGHTS).write_bytes(data[: len(data) // 3])
    (adapter / SUMS).unlink()
    refused(adapter, rf"cannot read adapter weights {adapter / PEFT_WEIGHTS}")


def test_missing_alpha_is_never_guessed(adapter: Path, tmp_path: Path) -> None:
    """peft would default lora_alpha to 8 whatever the rank: a silently wrong scale."""
    (adapter / SUMS).unlink()
    edit_config(adapter, lora_alpha=None)
    refused(adapter, rf"{adapter / PEFT_CONFIG} has no lora_alpha")
    model = build_preset("tiny")
    load_adapter(model, "t", adapter, alpha=8.0)
    assert adapter_scale(model, "t") == 2.0
    state = load_file(adapter / DIFFUSERS_WEIGHTS)
    meta = {"transformer.r": 4, "transformer.target_modules": ["to_q"]}
    bare = tmp_path / "no_alpha.safetensors"
    save_file(state, str(bare), metadata={DIFFUSERS_METADATA_KEY: json.dumps(meta), "format": "pt"})
    refused(bare, rf"{bare}: its {DIFFUSERS_METADATA_KEY} has no lora_alpha")


def test_bad_teacher_stops_the_cli_before_training(adapter: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    (adapter / SUMS).unlink()
    edit_config(adapter, r=2)
    out = tmp_path / "run"
    rc = main(["--config", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(out), "--set",
               "teachers.0.random_seed=-1", "--set", f"teachers.0.path='{adapter}'", "--set", "train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: adapter {adapter / PEFT_WEIGHTS} does not match the model" in err
    assert not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------ shipped base weights


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """A base model dir as shipped: `save_pretrained` + SHA256SUMS."""
    directory = tmp_path / "base"
    build_preset("tiny", seed=3).save_pretrained(str(directory))
    write_sha256sums(directory)
    return directory


WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_shipped_weights_load_and_bit_rot_is_named(shipped: Path) -> None:
    load_transformer(shipped)
    data = bytearray((shipped / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (shipped / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{shipped / WEIGHTS} is corrupt: its sha256 differs"):
        load_transformer(shipped)
    (shipped / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match="no weights in"):
        load_transformer(shipped)


def _rewrite(shipped: Path, edit) -> None:
    state = load_file(shipped / WEIGHTS)
    edit(state)
    save_file(state, str(shipped / WEIGHTS), metadata={"format": "pt"})
    (shipped / SUMS).unlink()  # hand-edited: only the structural checks can tell


def test_shipped_weights_with_missing_tensors_are_not_randomly_filled(shipped: Path) -> None:
    _rewrite(shipped, lambda s: s.pop("pos_embed.proj.bias"))
    with pytest.raises(ModelLoadError, match=rf"{shipped / WEIGHTS} does not match .*config.json: 1 weights missing "
                                             r"\(e\.g\. \['pos_embed\.proj\.bias'\]"):
        load_transformer(shipped)


def test_shipped_weights_with_nan_or_wrong_config(shipped: Path) -> None:
    _rewrite(shipped, lambda s: s["proj_out.weight"].view(-1)[7].fill_(float("inf")))
    with pytest.raises(ModelLoadError, match=rf"{shipped / WEIGHTS}: 1 tensors hold NaN/Inf \(e\.g\. \['proj_out"):
        load_transformer(shipped)
    cfg = json.loads((shipped / "config.json").read_text())
    (shipped / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ModelLoadError, match=rf"cannot load the transformer weights in {shipped} \(.*{WEIGHTS}\)"):
        load_transformer(shipped)


def test_corrupt_model_dir_stops_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a shipped base with an encoder that fits it (the builtin encoder fits only presets: refused by preflight)
    shipped = tmp_path / "base"
    shutil.copytree(REPO / "engine" / "worlds" / "toy" / "weights" / "base", shipped)
    data = (shipped / WEIGHTS).read_bytes()
    (shipped / WEIGHTS).write_bytes(data[: len(data) - 100])
    rc = main(["--config", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(tmp_path / "run"), "--set",
               f"model.path='{shipped}'", "--set", "data.encoder='toy'", "--set", "train.steps=1"])
    assert rc == 1 and f"error: {shipped / WEIGHTS} is corrupt" in capsys.readouterr().err
