"""The SD3 family's VAE (engine/backends/sd3/vae.py) against diffusers' StableDiffusion3Pipeline latent convention,
and the decoders of engine/eval/sampling.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends import get_backend
from engine.backends.sd3.vae import SD3VAE
from engine.errors import ModelLoadError
from engine.eval.sampling import eval_noise, make_decoder
from tests.fake_sd3 import build_fake_sd3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_sd3(tmp_path_factory.mktemp("sd3"))


def test_decode_is_the_pipelines_decode_of_its_final_latents(pipeline_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_dir))
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)  # SD3.5's factors
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["a red square"], num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
              max_sequence_length=12)
    latents = pipe(**kw, latents=start.clone(), output_type="latent").images
    image = pipe(**kw, latents=start.clone(), output_type="pt").images  # pipeline: decode(z / scale + shift)
    vae = SD3VAE.from_dir(pipeline_dir)
    torch.testing.assert_close((vae.decode(latents) + 1) / 2, image, atol=1e-5, rtol=1e-5)


def test_encode_is_the_training_convention_and_round_trips_through_decode(pipeline_dir: Path) -> None:
    from diffusers import AutoencoderKL

    raw = AutoencoderKL.from_pretrained(str(pipeline_dir / "vae"))
    vae = SD3VAE.from_dir(pipeline_dir)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mean - 0.0609) * 1.5305)  # diffusers' SD3 training scripts' convention
        torch.testing.assert_close(vae.decode(z), raw.decode(mean).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert z.shape == (2, 4, 8, 8)


def test_vae_lookup_and_decoders(pipeline_dir: Path, tmp_path: Path) -> None:
    backend = get_backend("sd3")
    assert backend.vae(None) is None and backend.vae(pipeline_dir / "transformer") is None
    vae = backend.vae(pipeline_dir)
    assert isinstance(vae, SD3VAE) and vae.to("cpu") is vae
    decode = make_decoder(backend, pipeline_dir, (4, 8, 8), CPU)
    img = decode(torch.zeros(1, 4, 8, 8))
    assert img.shape == (1, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    pixels = make_decoder(backend, None, (3, 16, 16), CPU)  # a pixel-space world: latents are the image
    torch.testing.assert_close(pixels(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).flatten(),
                               torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="model.path to a local sd3 pipeline dir with vae/"):
        make_decoder(backend, None, (16, 64, 64), CPU)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="cannot load the VAE in"):
        SD3VAE.from_dir(tmp_path)


def test_eval_noise_is_keyed_by_prompt_seed_and_sample_not_by_batch() -> None:
    a = eval_noise(3, [0, 1], 2, (4, 8, 8))
    b = eval_noise(2, [0, 1], 2, (4, 8, 8))
    assert a.shape == (12, 4, 8, 8)
    torch.testing.assert_close(a[:8], b)  # prompt i's noise does not depend on how many prompts follow
    assert not torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])  # other seed, other sample
    torch.testing.assert_close(eval_noise(1, [1], 2, (4, 8, 8)), a[2:4])
