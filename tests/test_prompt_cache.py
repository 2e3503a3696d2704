"""The prompt cache at real size: stored in the model dtype, written batch by batch, read row by row (a rank reads only
the rows of its own batches), a standard safetensors file; narrower caches are rebuilt, wider ones cast exactly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.encoders import HashTextEncoder
from engine.data import cache as cache_mod
from engine.data.cache import load_or_build
from engine.data.prompts import load_prompts
from engine.data.sampler import PromptSampler

PROMPTS = [f"prompt number {i} with some words" for i in range(70)]  # > 2 encoder batches of 32


class Recording(HashTextEncoder):
    """The hash encoder, recording the batch sizes it was called with."""

    def __init__(self) -> None:
        super().__init__(8, 32, 24)
        self.batches: list[int] = []

    def encode(self, prompts: list[str]) -> SD3Cond:
        self.batches.append(len(prompts))
        return super().encode(prompts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_in_the_model_dtype_in_batches_and_a_standard_safetensors_file(tmp_path: Path,
                                                                              dtype: torch.dtype) -> None:
    enc = Recording()
    path = tmp_path / "cache.safetensors"
    emb = load_or_build(enc, PROMPTS, path, SD3Cond, dtype)
    assert enc.batches == [32, 32, 7]  # 71 rows with "": never more than one batch of embeddings in memory
    want = HashTextEncoder(8, 32, 24).encode(emb.prompts)
    with safe_open(str(path), framework="pt") as f:  # safetensors' own reader agrees, byte for byte
        assert f.get_tensor("prompt_embeds").dtype == dtype
        assert torch.equal(f.get_tensor("prompt_embeds"), want.prompt_embeds.to(dtype))
        assert torch.equal(f.get_tensor("pooled"), want.pooled.to(dtype))
        assert f.metadata()["encoder"] == enc.identity
    assert emb.shapes == {"prompt_embeds": (71, 8, 32), "pooled": (71, 24)}
    some = [PROMPTS[5], PROMPTS[60], PROMPTS[5]]
    got = emb.cond(some)
    assert got.prompt_embeds.dtype == dtype
    assert torch.equal(got.prompt_embeds, HashTextEncoder(8, 32, 24).encode(some).prompt_embeds.to(dtype))
    assert path.stat().st_size < 71 * (8 * 32 + 24) * dtype.itemsize + 8192  # data + header (the prompt list)


def test_a_rank_reads_only_the_rows_of_its_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache.safetensors"
    prompts = load_prompts("builtin:tiny")
    emb = load_or_build(Recording(), [p.text for p in prompts], path, SD3Cond, torch.bfloat16)
    read: list[tuple[int, int]] = []
    real = os.preadv

    def counting(fd: int, buffers: list, offset: int) -> int:
        read.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(cache_mod.os, "preadv", counting)
    sampler = PromptSampler(prompts, seed=0, per_rank=2, group_size=1, accum=1, world=2, rank=1)
    batch = sampler.batch(3)
    emb.cond(batch.texts)
    row_bytes = (8 * 32 + 24) * 2
    assert sum(n for _, n in read) == len(batch.texts) * row_bytes  # exactly this rank's rows, nothing else
    assert len(read) == 2 * len(batch.texts)  # one positioned read per row and field


def test_a_wider_cache_is_cast_exactly_and_a_narrower_one_rebuilt(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.safetensors"
    enc = Recording()
    load_or_build(enc, PROMPTS, path, SD3Cond, torch.float32)
    bf16 = load_or_build(enc, PROMPTS, path, SD3Cond, torch.bfloat16)  # float32 file: reused, cast when read
    assert enc.batches == [32, 32, 7]
    exact = HashTextEncoder(8, 32, 24).encode(PROMPTS[:3]).prompt_embeds.to(torch.bfloat16)
    assert torch.equal(bf16.cond(PROMPTS[:3]).prompt_embeds, exact)  # what the model's own cast would give
    load_or_build(enc, PROMPTS, path, SD3Cond, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="engine.data.cache"):
        load_or_build(enc, PROMPTS[:10], path, SD3Cond, torch.bfloat16)  # other prompts: rebuilt in bfloat16
        fp32 = load_or_build(enc, PROMPTS[:10], path, SD3Cond, torch.float32)  # bfloat16 file: too narrow
    assert "narrower than this run's torch.float32" in caplog.text
    assert fp32.cond(PROMPTS[:1]).prompt_embeds.dtype == torch.float32 and len(enc.batches) == 5


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_damaged_cache_is_named_and_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.safetensors"
    enc = Recording()
    load_or_build(enc, PROMPTS, path, SD3Cond)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else (1 << 40).to_bytes(8, "little") + data[8:])
    with caplog.at_level(logging.WARNING, logger="engine.data.cache"):
        emb = load_or_build(enc, PROMPTS, path, SD3Cond)
    assert f"prompt cache {path} is unreadable" in caplog.text and len(enc.batches) == 6
    assert torch.equal(emb.cond(PROMPTS[-1:]).pooled, HashTextEncoder(8, 32, 24).encode(PROMPTS[-1:]).pooled)


def test_without_a_path_everything_stays_in_memory() -> None:
    emb = load_or_build(Recording(), PROMPTS[:3], None, SD3Cond, torch.bfloat16)
    assert emb.uncond.prompt_embeds.shape == (1, 8, 32) and emb.table.pooled.dtype == torch.bfloat16


def test_a_bfloat16_run_is_the_same_on_a_float32_and_a_bfloat16_cache(tmp_path: Path) -> None:
    """Storing the cache in the model dtype moves the cast from the model's input to the cache: the same values.
    Where CUDA is available the rollout is also replayed as CUDA graphs (static conditioning buffers in the model
    dtype): a GPU check owed from CPU-only sessions."""
    from engine.config import load_config
    from engine.metrics import read_metrics
    from engine.trainer import Trainer

    graphs = "true" if torch.cuda.is_available() else "false"
    repo = Path(__file__).resolve().parents[1]
    shared = tmp_path / "shared_cache.safetensors"
    rows = {}
    for name, dtype, cache in [("fp32_builds", "float32", shared), ("bf16_on_fp32_cache", "bfloat16", shared),
                               ("bf16_on_bf16_cache", "bfloat16", tmp_path / "own.safetensors")]:
        out = tmp_path / name
        cfg = load_config(repo / "configs" / "tiny.toml", [
            "rollout.steps=3", "train.steps=2", "train.save_every=0", "rollout.group_size=1",
            f"model.dtype='{dtype}'", f'data.cache="{cache}"', f'output_dir="{out}"',
            f"kernels.cuda_graphs={graphs}"])
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        rows[name] = [{k: r[k] for k in ("loss", "grad_norm", "data_crc")} for r in read_metrics(out / "metrics.jsonl")]
    with safe_open(str(shared), framework="pt") as f:
        assert f.get_slice("prompt_embeds").get_dtype() == "F32"  # reused, not rebuilt, by the bf16 run
    with safe_open(str(tmp_path / "own.safetensors"), framework="pt") as f:
        assert f.get_slice("prompt_embeds").get_dtype() == "BF16"
    assert rows["bf16_on_fp32_cache"] == rows["bf16_on_bf16_cache"]
    assert rows["bf16_on_bf16_cache"] != rows["fp32_builds"]  # the comparison can tell dtypes apart


def test_a_bfloat16_run_builds_and_trains_on_a_bfloat16_cache(tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "tiny.toml", ["rollout.steps=3", "train.steps=1", "rollout.group_size=1",
                                                       "model.dtype='bfloat16'", f'output_dir="{tmp_path}"'])
    trainer = Trainer(cfg)
    try:
        row = trainer.train_step(0)
    finally:
        trainer.close()
    assert row["loss"] > 0
    with safe_open(str(tmp_path / "prompt_cache.safetensors"), framework="pt") as f:
        assert f.get_slice("prompt_embeds").get_dtype() == "BF16"
