from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.encoders import HashTextEncoder
from engine.data.cache import load_or_build
from engine.data.prompts import load_prompts, parse_tagged


def test_prompt_formats(tmp_path: Path) -> None:
    assert parse_tagged("[text] the digit 7").task == "text"
    assert parse_tagged("no tag here").task == "default"
    txt = tmp_path / "p.txt"
    txt.write_text("[a] one\n\n[b] two\n")
    assert [p.task for p in load_prompts(str(txt))] == ["a", "b"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "x", "task": "geneval"}) + "\n")
    assert load_prompts(str(jl))[0].task == "geneval"
    jl.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1"):
        load_prompts(str(jl))
    with pytest.raises(ValueError, match="not found"):
        load_prompts(str(tmp_path / "none.txt"))
    with pytest.raises(ValueError, match="unknown builtin"):
        load_prompts("builtin:nope")
    assert len(load_prompts("builtin:tiny")) == 8


def test_hash_encoder_deterministic_and_distinct() -> None:
    enc = HashTextEncoder(8, 32, 32)
    a = enc.encode(["a red square", "", "the digit 7"])
    b = HashTextEncoder(8, 32, 32).encode(["a red square", "", "the digit 7"])
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(a.pooled, b.pooled)
    assert a.prompt_embeds.shape == (3, 8, 32) and a.pooled.shape == (3, 32)
    assert torch.count_nonzero(a.prompt_embeds[1]) == 0
    assert not torch.allclose(a.prompt_embeds[0], a.prompt_embeds[2])


class CountingEncoder(HashTextEncoder):
    calls = 0

    def encode(self, prompts):
        CountingEncoder.calls += 1
        return super().encode(prompts)


def test_cache_reuse_rebuild_and_corruption(tmp_path: Path) -> None:
    enc = CountingEncoder(8, 32, 32)
    path = tmp_path / "cache.safetensors"
    first = load_or_build(enc, ["b", "a", "b"], path, SD3Cond)
    assert first.prompts == ["", "a", "b"] and CountingEncoder.calls == 1
    again = load_or_build(enc, ["a", "b"], path, SD3Cond)
    assert CountingEncoder.calls == 1 and torch.equal(again.table.prompt_embeds, first.table.prompt_embeds)
    torch.testing.assert_close(again.cond(["b"]).prompt_embeds, HashTextEncoder(8, 32, 32).encode(["b"]).prompt_embeds)
    load_or_build(enc, ["a", "c"], path, SD3Cond)  # other prompts: rebuilt
    assert CountingEncoder.calls == 2
    path.write_bytes(b"junk")
    rebuilt = load_or_build(enc, ["a", "c"], path, SD3Cond)  # corrupt: rebuilt, not crashed
    assert CountingEncoder.calls == 3 and rebuilt.uncond.prompt_embeds.shape == (1, 8, 32)


def test_cache_file_gets_the_umask_mode(tmp_path: Path) -> None:
    """safetensors writes 0600; a `data.cache` shared between users must be readable like any file they write."""
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "cache.safetensors"
        load_or_build(CountingEncoder(8, 32, 32), ["a"], path, SD3Cond)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
