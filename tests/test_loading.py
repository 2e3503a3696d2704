from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.loading import ModelLoadError, build_preset, load_transformer, preset_from_model
from tests.helpers import tiny_inputs


def test_presets_are_deterministic_and_sd35_shaped() -> None:
    a, b = build_preset("tiny", seed=3), build_preset("tiny", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    from engine.backends.sd3.presets import PRESETS

    sd = PRESETS["sd35-medium"].transformer
    assert (sd["num_layers"], sd["num_attention_heads"], sd["attention_head_dim"]) == (24, 24, 64)
    assert sd["qk_norm"] == "rms_norm" and tuple(sd["dual_attention_layers"]) == tuple(range(13))
    with pytest.raises(KeyError, match="valid"):
        build_preset("sd4")


@pytest.mark.parametrize("layout", ["transformer_dir", "pipeline_dir"])
def test_load_local_dir_equals_saved_model(tmp_path: Path, layout: str) -> None:
    model = build_preset("tiny", seed=5)
    target = tmp_path / "m" / ("transformer" if layout == "pipeline_dir" else "")
    model.save_pretrained(str(target))
    loaded = load_transformer(tmp_path / "m")
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(predict_velocity(loaded, *inputs), predict_velocity(model, *inputs))
    assert preset_from_model(loaded, 8).latent_channels == 4


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"no transformer config.json in {tmp_path}"):
        load_transformer(tmp_path)
    model = build_preset("tiny")
    model.save_pretrained(str(tmp_path / "m"))
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ModelLoadError, match="cannot load the transformer weights in .*m"):
        load_transformer(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights in"):
        load_transformer(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot parse .*config.json"):
        load_transformer(tmp_path / "m")
