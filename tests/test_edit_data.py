"""Edit rows' data: DanceOPD's CSV and jsonl read as its loader reads them, every bad or missing image named by file
and line at preflight (exit 2, nothing written), the image cache (content-addressed, rebuilt when stale or torn),
and each row's conditioning (T2I rows from the prompt cache, edit rows = edit captions + their source image)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.backends.zimage.backend import ZImageBackend
from engine.backends.zimage.cond import ZImageCond
from engine.backends.zimage.encoders import HashPromptEncoder, PixelImageEncoder
from engine.config import ConfigError, load_config
from engine.data.cache import load_or_build
from engine.data.images import EditCaptions, ImageCache, RowConditioning, file_digest
from engine.data.prompts import load_prompts

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_edit.toml"
SHAPE = (3, 16, 16)


def _png(path: Path, seed: int, size: int = 16) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def _csv(tmp: Path, rows: list[str]) -> Path:
    path = tmp / "data" / "prompts.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("task,prompt,source_image,target_image\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp: Path, prompts: Path, *extra: str):
    return load_config(CONFIG, [f'output_dir="{tmp / "run"}"', f'data.prompts="{prompts}"',
                                "data.task_weights={}", *extra], paths=True)


def test_danceopd_csv_and_jsonl_read_as_danceopd_reads_them(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "img" / "a.png", 0)
    path = tmp_path / "data" / "p.csv"
    # a BOM (utf-8-sig), a prompt with runs of whitespace, an empty task (-> default), a row without a prompt
    path.write_bytes("\ufefftask,prompt,source_image,target_image\n"
                     "local_edit,  make   the red\tsquare blue ,img/a.png,\n"
                     ",a plain prompt,,\n"
                     "t2i,,,\n".encode())
    rows = load_prompts(str(path))
    assert [(r.text, r.task) for r in rows] == [("make the red square blue", "local_edit"),
                                                ("a plain prompt", "default")]
    assert rows[0].source == str(tmp_path / "data" / "img" / "a.png") and rows[0].target == ""
    assert rows[0].where == f"{path}:2" and rows[1].where == f"{path}:3"
    jl = tmp_path / "data" / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "make it night", "task": "global_edit", "source_image": "img/a.png"}) + "\n")
    (row,) = load_prompts(str(jl))
    assert row.source == str(tmp_path / "data" / "img" / "a.png") and row.where == f"{jl}:1"
    with pytest.raises(ValueError, match=r"p.csv:1: a prompt CSV needs a 'prompt' column"):
        path.write_text("task,caption\nt2i,x\n")
        load_prompts(str(path))


def test_bad_or_missing_images_are_named_by_file_and_line_before_any_work(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "ok.png", 0)
    (tmp_path / "data" / "text.png").write_text("not an image")
    csv = _csv(tmp_path, ["local_edit,[local_edit] make the red square blue,ok.png,",
                          "local_edit,[local_edit] make the blue square red,missing.png,",
                          "global_edit,[global_edit] make it night,text.png,",
                          "local_edit,[local_edit] make the green square red,,",
                          "global_edit,[global_edit] make it day,ok.png,nothere.png",
                          "t2i,[t2i] a red square at day,,"])
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, csv)
    text = "\n".join(info.value.problems)
    assert f"{csv}:3: source_image {tmp_path / 'data' / 'missing.png'}: file not found" in text
    assert f"{csv}:4: source_image {tmp_path / 'data' / 'text.png'}: PIL cannot read it as an image" in text
    assert f"{csv}:5: task 'local_edit' is an edit task" in text and f"e.g. {csv}:2" in text
    assert f"{csv}:6: target_image {tmp_path / 'data' / 'nothere.png'}: file not found" in text
    assert ":2:" not in text.replace(f"e.g. {csv}:2", "") and ":7:" not in text  # the good rows are not named
    assert not (tmp_path / "run").exists()  # nothing written

    from engine.train import main

    assert main(["--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), "--set",
                 f'data.prompts="{csv}"', "--set", "data.task_weights={}"]) == 2
    assert not (tmp_path / "run").exists()


def test_family_rules_on_source_images(tmp_path: Path) -> None:
    small = _png(tmp_path / "data" / "small.png", 1, size=32)
    csv = _csv(tmp_path, [f"local_edit,[local_edit] make the red square blue,{small.name},",
                          "t2i,[t2i] a red square at day,,", "global_edit,[global_edit] make it night,small.png,"])
    cfg = _config(tmp_path, csv)  # the world's pixel encoder resizes any image
    assert sum(1 for p in load_prompts(cfg.data.prompts) if p.source) == 2
    # the real pipeline's VAE path: ZImageOmniPipeline refuses condition images under 64 px a side
    backend = ZImageBackend()
    cfg.data.encoder = str(tmp_path / "pipeline")
    assert "Z-Image needs >= 64 px a side" in backend.source_image_problem(cfg, (32, 32))
    assert backend.source_image_problem(cfg, (64, 80)) == ""
    with pytest.raises(ConfigError, match=r"prompts.csv:2: source_image .*small.png: model.family = 'sd3' has no "
                                          r"edit conditioning"):
        load_config(None, [f'output_dir="{tmp_path / "sd3"}"', f'data.prompts="{csv}"',
                           'opd.routes={t2i="compose", local_edit="compose", global_edit="compose"}',
                           "data.task_weights={}"], paths=True)


class _CountingPixels(PixelImageEncoder):
    calls = 0

    def encode(self, images):
        _CountingPixels.calls += len(images)
        return super().encode(images)


def test_image_cache_is_content_addressed_and_rebuilds_stale_or_torn_entries(tmp_path: Path, caplog) -> None:
    a, b = _png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1)
    copy = tmp_path / "copy_of_a.png"
    copy.write_bytes(a.read_bytes())
    enc = _CountingPixels(SHAPE)
    cache = ImageCache(enc.identity, tmp_path / "cache")
    files = {file_digest(p): str(p) for p in (a, b, copy)}
    assert len(files) == 2 and cache.build(enc, files) == 2 and _CountingPixels.calls == 2  # a and its copy: once
    assert cache.build(enc, files) == 0 and _CountingPixels.calls == 2  # cached
    pixels = np.asarray(Image.open(a).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(cache.get(file_digest(a))["source"], torch.from_numpy(pixels), rtol=0, atol=0)
    cache.entry(file_digest(b)).write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        assert ImageCache(enc.identity, tmp_path / "cache").build(enc, files) == 1
    assert "unreadable" in caplog.text and str(cache.entry(file_digest(b))) in caplog.text
    _png(a, 5)  # the file changed: a new digest, a new entry
    assert cache.build(enc, {file_digest(a): str(a)}) == 1
    other = ImageCache("zimage-pixels:8x8", tmp_path / "cache")  # another encoder/size: its own entries
    assert other.directory != cache.directory
    with pytest.raises(KeyError, match="missing"):
        other.get(file_digest(b))


def test_row_conditioning_puts_each_rows_image_in_its_row(tmp_path: Path) -> None:
    from engine.data.prompts import Prompt

    imgs = [_png(tmp_path / f"{i}.png", i) for i in range(2)]
    prompts = [Prompt("[t2i] a red square at day", "t2i"), Prompt("[local_edit] make the red square blue",
                                                                  "local_edit", str(imgs[0])),
               Prompt("[local_edit] make the red square blue", "local_edit", str(imgs[1])),
               Prompt("[global_edit] make it night", "global_edit", str(imgs[0]))]
    text = HashPromptEncoder(32, SHAPE, 16)
    t2i = load_or_build(text, [prompts[0].text], tmp_path / "p.safetensors", ZImageCond)
    edit = load_or_build(EditCaptions(text), [p.text for p in prompts[1:]], tmp_path / "e.safetensors", ZImageCond)
    enc = PixelImageEncoder(SHAPE)
    cache = ImageCache(enc.identity, tmp_path / "cache")
    digests = ["", *(file_digest(p.source) for p in prompts[1:])]
    cache.build(enc, {d: p.source for d, p in zip(digests, prompts) if d})
    rows = RowConditioning(prompts, t2i, edit, cache, digests).rows([2, 0, 3, 1])
    assert rows.n_source.tolist() == [1, 0, 1, 1]
    for k, i in enumerate([2, 0, 3, 1]):
        want = (text.encode_edit([prompts[i].text]).with_images(enc.encode([Image.open(prompts[i].source)]))
                if prompts[i].source else text.encode([prompts[i].text]))
        for name, t in want.tensors().items():
            assert torch.equal(getattr(rows, name)[k], t[0]), (k, name)
    assert not torch.equal(rows.source[0], rows.source[3])  # two rows, one prompt, two sources


def test_prompt_cache_keeps_zero_size_fields_per_row(tmp_path: Path) -> None:
    """Z-Image without a SigLIP branch stores `siglip` as [N, 0, 0]: reading rows of it must give [rows, 0, 0]."""
    text = HashPromptEncoder(32, SHAPE, 16)
    emb = load_or_build(text, ["[t2i] a red square at day", "[t2i] a blue square at day"], tmp_path / "c.safetensors",
                        ZImageCond)
    rows = emb.cond(["[t2i] a blue square at day", ""])
    assert rows.siglip.shape == (2, 0, 0) and emb.uncond.siglip.shape == (1, 0, 0)
    assert torch.equal(rows.cap, text.encode(["[t2i] a blue square at day", ""]).cap)
