"""The real-weights path on a fake SD3 pipeline dir: SD3 text encoders, the prompt cache, model.path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.encoders import SD3TextEncoder
from engine.config import load_config
from engine.data.cache import load_or_build
from engine.data.encode import main as encode_main
from tests.fake_sd3 import POOLED, T5_DIM, build_fake_sd3

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_sd3(tmp_path_factory.mktemp("sd3"))


def test_sd3_encoder_shapes_lazy_and_matches_pipeline(pipeline_dir: Path) -> None:
    enc = SD3TextEncoder(pipeline_dir, max_sequence_length=12)
    assert enc.pipe is None  # nothing loaded until the first encode
    assert (enc.seq_len, enc.dim, enc.pooled_dim) == (77 + 12, T5_DIM, POOLED)
    cond = enc.encode(["a red square", "the digit 7", ""])
    assert cond.prompt_embeds.shape == (3, 89, T5_DIM) and cond.pooled.shape == (3, POOLED)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_dir), transformer=None, vae=None)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=["the digit 7"], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=12)
    torch.testing.assert_close(cond.prompt_embeds[1:2], embeds)
    torch.testing.assert_close(cond.pooled[1:2], pooled)


def test_encode_cli_then_cache_hit_without_loading(pipeline_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("[compose] a red square left of a blue circle\n[text] the digit 7\n")
    cache = tmp_path / "cache.safetensors"
    assert encode_main(["--prompts", str(prompts), "--encoder", str(pipeline_dir), "--out", str(cache),
                        "--max-sequence-length", "12"]) == 0
    enc = SD3TextEncoder(pipeline_dir, max_sequence_length=12)
    emb = load_or_build(enc, ["[text] the digit 7", "[compose] a red square left of a blue circle"], cache, SD3Cond)
    assert enc.pipe is None and emb.table.prompt_embeds.shape == (3, 89, T5_DIM)


def test_missing_encoder_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no text_encoder/"):
        SD3TextEncoder(tmp_path)


def test_train_from_local_pipeline_dir(pipeline_dir: Path, tmp_path: Path) -> None:
    from engine.trainer import Trainer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red square", "task": "compose"}\n{"prompt": "the digit 7", "task": "text"}\n')
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'model.path="{pipeline_dir}"', f'data.encoder="{pipeline_dir}"', f'data.prompts="{prompts}"',
        "data.max_sequence_length=12", "train.steps=2", "train.save_every=0", "rollout.steps=3",
        f'output_dir="{tmp_path / "run"}"',
    ], paths=True)
    trainer = Trainer(cfg)
    rows = trainer.train()
    trainer.close()
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "export" / "adapter_model.safetensors").is_file()
    assert trainer.embeddings.table.prompt_embeds.shape == (3, 89, T5_DIM)
