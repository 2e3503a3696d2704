"""SD3's VAE: `AutoencoderKL` of a local pipeline dir, with the pipeline's latent convention.

diffusers' StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor` (SD3.5: 1.5305, 0.0609), so
the transformer's latents are `(vae.encode(x).mean - shift_factor) * scaling_factor`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import ModelLoadError


class SD3VAE:
    """encode/decode between [-1, 1] pixels and the transformer's latents (deterministic: the posterior mean)."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def from_dir(cls, path: Path, dtype: torch.dtype = torch.float32) -> SD3VAE:
        """The VAE of pipeline dir `path` (its `vae/`); errors name the dir."""
        from diffusers import AutoencoderKL

        sub = path / "vae"
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"no VAE in {path}: expected {sub / 'config.json'}")
        try:
            return cls(AutoencoderKL.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True,
                                                 use_safetensors=True))
        except Exception as exc:  # diffusers/safetensors raise many types for bad files
            raise ModelLoadError(f"cannot load the VAE in {sub}: {exc}") from exc

    def to(self, device: torch.device | str) -> SD3VAE:
        """Move the VAE to `device` (encode/decode run where its weights are); returns self."""
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8] as the transformer sees them."""
        p = next(self.vae.parameters())
        mean = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
        return ((mean - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer sees them -> [B, 3, H, W] in [-1, 1] (float32)."""
        p = next(self.vae.parameters())
        z = latents.to(p.device, p.dtype) / self.scaling + self.shift
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)
