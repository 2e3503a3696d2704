"""The Z-Image backend against diffusers' own pipelines on a tiny random pipeline dir (tests/fake_zimage.py).

Parity: the backend's velocity for the rows it builds from a prompt + source image equals what ZImageOmniPipeline
(edit) and ZImagePipeline (T2I) feed to and get from the transformer at every denoising step, conditional and
unconditional rows alike (captured with a forward hook); LoRA gradients through the backend equal those through a
hand-written plain diffusers call. Plus: the real architecture's parameter count on the meta device, strict loading
errors, the schedule, FLOPs against torch's flop counter, the LoRA file round trip, the attention refusal.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.backends import get_backend
from engine.backends.zimage import ZImageCond
from engine.backends.zimage.encoders import QwenPromptEncoder, SourceEncoder
from engine.backends.zimage.forward import model_timestep
from engine.backends.zimage.presets import LORA_TARGETS, PRESETS
from tests.fake_zimage import IMAGE_PX, LATENT_CHANNELS, build_fake_zimage, source_image

PROMPT = "make the red square blue"
DTYPES = {"vae": torch.bfloat16, "default": torch.float32}  # the Omni pipeline encodes condition images in bf16


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_zimage(tmp_path_factory.mktemp("zimage") / "pipe")


@pytest.fixture(scope="module")
def backend():
    return get_backend("zimage")


def _capture(pipe) -> list:
    calls: list = []
    names = ("x", "t", "cap_feats")  # ZImagePipeline passes these positionally, the Omni pipeline by keyword

    def hook(module, args, kwargs, out) -> None:
        calls.append(({**dict(zip(names, args)), **kwargs}, [o.clone() for o in out[0]]))

    pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    return calls


def _encoders(backend, pipe_dir: Path, spec):
    text = backend.text_encoder(str(pipe_dir), spec, 512)
    assert isinstance(text, QwenPromptEncoder)
    return text, backend.source_encoder(pipe_dir, spec)


def test_edit_velocity_matches_omni_pipeline(pipe_dir: Path, backend) -> None:
    from diffusers import ZImageOmniPipeline

    pipe = ZImageOmniPipeline.from_pretrained(str(pipe_dir), dtype=DTYPES)
    calls = _capture(pipe)
    image = source_image(0)
    noise = torch.randn(1, LATENT_CHANNELS, IMAGE_PX // 4, IMAGE_PX // 4, generator=torch.Generator().manual_seed(1))
    pipe(image=[image], prompt=PROMPT, num_inference_steps=3, guidance_scale=2.0, latents=noise.clone(),
         output_type="latent")
    model, spec = backend.load(pipe_dir, torch.float32, latent_size=IMAGE_PX // 4)
    text, sources = _encoders(backend, pipe_dir, spec)
    latents, siglip, grid = sources.encode([image])
    cond = text.encode_edit([PROMPT]).with_source(latents, siglip, grid)
    rows = ZImageCond.cat([cond, cond.uncond_twin(text.encode([""]))])  # the pipeline's [cond; uncond] order
    kw0 = calls[0][0]
    for i in range(2):  # the inputs the pipeline built, bit for bit
        assert torch.equal(kw0["x"][i][0].squeeze(1), rows.source[i])
        assert torch.equal(kw0["siglip_feats"][i][0].flatten(0, 1), rows.siglip[i, : int(grid[0].prod())])
        assert all(torch.equal(a, b) for a, b in zip(kw0["cap_feats"][i], rows.segments(i)))
        assert len(kw0["cap_feats"][i]) == 3 and kw0["image_noise_mask"][i] == [0, 1]
    sigmas = pipe.scheduler.sigmas
    worst = 0.0
    for step, (kw, out) in enumerate(calls):
        x = torch.stack([xs[-1].squeeze(1) for xs in kw["x"]])
        assert torch.equal(model_timestep(sigmas[step].expand(2)), kw["t"])
        v = backend.velocity(model, x, sigmas[step].expand(2), rows)
        ref = -torch.stack(out).squeeze(2)
        worst = max(worst, (v - ref).abs().max().item())
    assert worst == 0.0, f"max |v_backend - v_pipeline| = {worst}"  # measured: 0.0 (same call, same lists)


def test_t2i_velocity_matches_zimage_pipeline(pipe_dir: Path, backend) -> None:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(pipe_dir), dtype=DTYPES)
    calls = _capture(pipe)
    noise = torch.randn(1, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(2))
    pipe(prompt="a green circle on grass", height=IMAGE_PX, width=IMAGE_PX, num_inference_steps=3,
         guidance_scale=3.0, latents=noise.clone(), output_type="latent")
    model, spec = backend.load(pipe_dir, torch.float32, latent_size=16)
    text, _ = _encoders(backend, pipe_dir, spec)
    cond = text.encode(["a green circle on grass"])
    rows = ZImageCond.cat([cond, cond.uncond_twin(text.encode([""]))])
    assert rows.cap_lens[:, 1:].sum() == 0 and (rows.n_source == 0).all()
    sigmas = pipe.scheduler.sigmas
    for step, (kw, out) in enumerate(calls):
        assert all(torch.equal(a, b) for a, b in zip(kw["cap_feats"], (rows.segments(0)[0], rows.segments(1)[0])))
        x = torch.stack([xi.squeeze(1) for xi in kw["x"]])
        v = backend.velocity(model, x, sigmas[step].expand(2), rows)
        assert torch.equal(v, -torch.stack(out).squeeze(2)), (v + torch.stack(out).squeeze(2)).abs().max()


def test_schedule_matches_pipeline(backend) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    for steps in (1, 3, 9, 16):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=0.5)
        assert torch.equal(backend.sigmas(steps, 3.0), sched.sigmas)


def _add_lora(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """A peft adapter on DanceOPD's targets with non-zero B (so every LoRA weight gets a gradient)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)), adapter_name="s")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _lora_model(backend, seed: int = 3):
    model, spec = backend.build("zimage-tiny", 0, torch.float32)
    return _add_lora(model, seed), spec


def _mixed_rows(backend, spec, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, ZImageCond]:
    enc = backend.text_encoder("builtin", spec, 32)
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(2, *spec.latent_shape, generator=gen)
    edit = enc.encode_edit(["[local_edit] make the red square blue", "[global_edit] make it night"]).with_source(src)
    t2i = enc.encode(["[t2i] a red square at night"])
    rows = ZImageCond.cat([edit[:1], t2i, edit[1:], edit.uncond_twin(enc.encode([""]))[:1]])
    x = torch.randn(len(rows), *spec.latent_shape, generator=gen)
    return x, torch.tensor([0.9, 0.5, 0.3, 0.7]), rows


def _pipeline_rows(backend, pipe_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, ZImageCond]:
    """The fake Omni pipeline's transformer and edit rows with SigLIP features (cond, uncond) plus a T2I row."""
    model, spec = backend.load(pipe_dir, torch.float32, latent_size=IMAGE_PX // 4)
    text, sources = _encoders(backend, pipe_dir, spec)
    lat, sig, grid = sources.encode([source_image(0), source_image(1)])
    edit = text.encode_edit([PROMPT, "turn it into night"]).with_source(lat, sig, grid)
    rows = ZImageCond.cat([edit, edit.uncond_twin(text.encode([""]))[:1], text.encode(["a green circle"])])
    x = torch.randn(len(rows), *spec.latent_shape, generator=torch.Generator().manual_seed(6))
    return model, x, torch.tensor([0.95, 0.6, 0.4, 0.2]), rows


def _plain_diffusers(model, x, sigma, rows: ZImageCond) -> torch.Tensor:
    """The velocity written out by hand, one diffusers call per row, the way the pipelines build their lists."""
    out = []
    for i in range(len(rows)):
        lens = rows.cap_lens[i].tolist()
        start = [sum(lens[:k]) for k in range(4)]
        t = (1000 - sigma[i : i + 1] * 1000) / 1000
        if int(rows.n_source[i]) == 0:
            pred = model([x[i].unsqueeze(1)], t, [rows.cap[i, : lens[0]]], return_dict=False)[0][0]
        else:
            caps = [rows.cap[i, start[k] : start[k] + lens[k]] for k in (1, 2, 3)]
            h, w = rows.siglip_hw[i].tolist()
            sig = [[rows.siglip[i, : h * w].view(h, w, -1), None]] if h * w else [None]
            pred = model([[rows.source[i].unsqueeze(1), x[i].unsqueeze(1)]], t, [caps], siglip_feats=sig,
                         image_noise_mask=[[0, 1]], return_dict=False)[0][0]
        out.append(-pred.squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("rows_of", ["tiny-mixed", "omni-siglip"])
def test_lora_gradients_match_plain_diffusers(backend, pipe_dir: Path, rows_of: str) -> None:
    if rows_of == "tiny-mixed":  # edit, T2I, edit, uncond edit: one forward per kind, scattered back
        model, spec = _lora_model(backend)
        x, sigma, rows = _mixed_rows(backend, spec)
    else:  # the pipeline's Omni transformer: edit rows with SigLIP features, their uncond twin, a T2I row
        model, x, sigma, rows = _pipeline_rows(backend, pipe_dir)
        _add_lora(model)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    params = [p for p in model.parameters() if p.requires_grad]
    v = backend.velocity(model, x, sigma, rows)
    g_backend = torch.autograd.grad((v * w).sum(), params)
    v_ref = _plain_diffusers(model, x, sigma, rows)
    g_ref = torch.autograd.grad((v_ref * w).sum(), params)
    # rows batched by kind (backend) vs one per call (here): equal up to float32 summation order and the batch
    # padding mask. Measured: |dv| <= 7.2e-7 (both); worst relative LoRA-grad diff 1.6e-6 (tiny) / 4.7e-6 (omni).
    assert (v - v_ref).abs().max() < 1e-5
    worst = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item() for a, b in zip(g_backend, g_ref))
    assert worst < 1e-4, f"worst relative LoRA-gradient difference {worst}"
    assert sum(int((g != 0).any()) for g in g_backend) == len(params)  # every adapter weight gets a gradient


def test_rows_are_independent_and_cond_ops(backend) -> None:
    model, spec = backend.build("zimage-tiny", 0, torch.float32)
    x, sigma, rows = _mixed_rows(backend, spec)
    with torch.no_grad():
        v = backend.velocity(model, x, sigma, rows)
        for idx in ([0], [1, 3], [2, 0]):
            sub = backend.velocity(model, x[idx], sigma[idx], rows[idx])
            assert (sub - v[idx]).abs().max() < 1e-5
    again = ZImageCond.from_tensors(rows.tensors())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), rows.tensors().values()))
    buf = rows.zeros(4).copy_(rows)
    assert torch.equal(buf.cap, rows.cap) and buf.cap_lens.dtype == torch.int64
    picked = ZImageCond.where(torch.tensor([True, False, True, False]), rows, rows.zeros(4))
    assert torch.equal(picked.source[0], rows.source[0]) and int(picked.n_source[1]) == 0
    assert rows.to(dtype=torch.bfloat16).cap.dtype == torch.bfloat16 and rows.to(dtype=torch.bfloat16).cap_lens.dtype \
        == torch.int64


def test_uncond_twin_keeps_the_source_image(backend) -> None:
    _, spec = backend.build("zimage-tiny", 0, torch.float32)
    enc = backend.text_encoder("builtin", spec, 32)
    src = torch.randn(2, *spec.latent_shape)
    edit = enc.encode_edit(["[local_edit] make the red square blue", "[global_edit] make it night"]).with_source(src)
    empty = enc.encode([""])
    twin = edit.uncond_twin(empty)
    assert torch.equal(twin.source, edit.source) and torch.equal(twin.n_source, edit.n_source)
    empty_edit = enc.encode_edit([""]).with_source(src[:1])
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(twin.segments(i), empty_edit.segments(0)))
    t2i = enc.encode(["[t2i] a red square"]).uncond_twin(empty)
    assert torch.equal(t2i.segments(0)[0], empty.segments(0)[0]) and not t2i.source.any()
    with pytest.raises(ValueError, match="Omni"):
        edit.uncond_twin(enc.encode(["x"])[:1].zeros(1))
    with pytest.raises(ValueError, match="Omni edit layout"):
        enc.encode(["a"]).with_source(src[:1])


def test_real_architecture_on_meta(backend) -> None:
    from diffusers import ZImageTransformer2DModel

    counts = {}
    for name in ("zimage-turbo", "zimage-omni"):
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**PRESETS[name].transformer)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts["zimage-turbo"] == 6_154_908_736  # Tongyi-MAI/Z-Image-Turbo's transformer
    d, f, s = 3840, int(3840 / 3 * 8), 1152
    block = 4 * d * d + 2 * 128 + 3 * d * f + 4 * d  # no modulation: attention, qk norms, SwiGLU, four RMSNorms
    assert counts["zimage-omni"] - counts["zimage-turbo"] == s + s * d + d + 2 * block + d


def test_load_errors_name_the_file(tmp_path: Path, backend, pipe_dir: Path) -> None:
    from engine.backends.zimage.backend import ZImageLoadError
    from engine.files import write_sha256sums

    with pytest.raises(ZImageLoadError, match="no transformer config.json"):
        backend.load(tmp_path, torch.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ZImageLoadError, match=str(bad / "config.json")):
        backend.load(bad, torch.float32)
    (bad / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ZImageLoadError, match="not a ZImageTransformer2DModel"):
        backend.load(bad, torch.float32)
    (bad / "config.json").write_text((pipe_dir / "transformer" / "config.json").read_text())
    with pytest.raises(ZImageLoadError, match="no weights in"):
        backend.load(bad, torch.float32)
    model, _ = backend.build("zimage-tiny", 0, torch.float32)
    model.save_pretrained(str(tmp_path / "ok"))
    write_sha256sums(tmp_path / "ok")
    loaded, spec = backend.load(tmp_path / "ok", torch.float32, latent_size=16)
    assert spec.latent_shape == (3, 16, 16) and spec.name == "loaded"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    weights = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ZImageLoadError, match="diffusion_pytorch_model.safetensors"):
        backend.load(tmp_path / "ok", torch.float32)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        backend.text_encoder(str(tmp_path), spec, 64).encode(["x"])


def test_attention_and_config_checks(backend) -> None:
    model, _ = backend.build("zimage-tiny", 0, torch.float32)
    with pytest.raises(ValueError, match="single-stream"):
        backend.install_attention(model, "fused", "sdpa")
    backend.install_attention(model, "reference", "sdpa")
    cfg = SimpleNamespace(model=SimpleNamespace(preset="zimage-tiny", path="", latent_size=15, attention="fused"),
                          student=SimpleNamespace(targets=["to_q", "add_q_proj"]), data=SimpleNamespace(encoder=""))
    problems = backend.config_problems(cfg)
    assert any("multiple of the patch size" in p for p in problems) and any("single-stream" in p for p in problems)
    assert any("add_q_proj" in p for p in backend.preflight(cfg))
    cfg.model.preset = "sd35-medium"
    assert any("valid for family 'zimage'" in p for p in backend.config_problems(cfg))


@pytest.mark.parametrize("edit", [False, True])
def test_forward_flops_against_flop_counter(backend, edit: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model, spec = backend.build("zimage-tiny", 0, torch.float32)
    enc = backend.text_encoder("builtin", spec, 32)
    prompt = "[t2i] a red square left of a blue square at night"
    cond = enc.encode_edit([prompt]).with_source(torch.randn(1, *spec.latent_shape)) if edit else enc.encode([prompt])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        backend.velocity(model, torch.randn(1, *spec.latent_shape), torch.tensor([0.5]), cond)
    from engine.backends.zimage.flops import forward_flop_parts

    caps = [int(n) for n in (cond.cap_lens[0, 1:] if edit else cond.cap_lens[0, :1])]
    ours = forward_flop_parts(spec.config, spec.latent_shape[1:], caps, edit=edit)
    # torch's counter has no formula for CPU SDPA (aten._scaled_dot_product_flash_attention_for_cpu): every linear
    # matches exactly, attention (4 n^2 D per block) is ours alone
    assert ours["total"] - ours["attention"] == counter.get_total_flops()
    assert backend.forward_flops(spec, 8, LORA_TARGETS) > backend.forward_flops(spec, None, ())


def test_save_lora_loads_back_through_diffusers(tmp_path: Path, backend) -> None:
    from peft.utils import get_peft_model_state_dict

    model, spec = _lora_model(backend)
    x, sigma, rows = _mixed_rows(backend, spec)
    with torch.no_grad():
        ref = backend.velocity(model, x, sigma, rows)
    state = get_peft_model_state_dict(model, adapter_name="s")
    meta = model.peft_config["s"].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    backend.save_lora(tmp_path, state, meta, "pytorch_lora_weights.safetensors")
    fresh, _ = backend.build("zimage-tiny", 0, torch.float32)
    fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="s")
    with torch.no_grad():
        assert torch.equal(backend.velocity(fresh, x, sigma, rows), ref)


def test_vae_and_source_encoder(pipe_dir: Path, backend, tmp_path: Path) -> None:
    vae = backend.vae(pipe_dir)
    assert (vae.scaling, vae.shift, vae.scale_factor) == (0.3611, 0.1159, 4)
    assert backend.vae(tmp_path) is None and backend.vae(None) is None
    _, spec = backend.load(pipe_dir, torch.float32, latent_size=IMAGE_PX // 4)
    sources = backend.source_encoder(pipe_dir, spec)
    assert isinstance(sources, SourceEncoder) and sources.vae.vae.dtype == torch.bfloat16
    lat, sig, grid = sources.encode([source_image(2)], size=(IMAGE_PX, IMAGE_PX))
    assert lat.shape == (1, *spec.latent_shape) and grid.tolist() == [[4, 4]] and sig.shape == (1, 16, 24)
    assert vae.decode(lat).shape == (1, 3, IMAGE_PX, IMAGE_PX)
