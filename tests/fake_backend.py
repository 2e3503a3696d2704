"""A test-only model family, plugged in from outside the engine (no engine file names it): proof of the seam.

`TinyMixer` is a small diffusers model (ModelMixin + PeftAdapterMixin, so peft adapters load as on real models)
that is not an MMDiT: the latent's pixels and a mean-pooled text vector go through a few Linear layers. Its
conditioning is `FakeCond(tokens)`; its timestep convention is its own (`1 - sigma`, unlike SD3's 1000 sigma) and
its unconditional twin keeps each row's `keep` tensor (as an edit field keeps the source image), so the row plan's
`uncond_twin` hook is exercised too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from safetensors.torch import save_file

from engine.backends.base import ModelSpec, TensorCond

TEXT, WIDTH, CHANNELS, SIZE = 6, 16, 2, 4


@dataclass(frozen=True)
class FakeCond(TensorCond):
    """Token embeddings and a per-row tensor that the unconditional twin keeps."""

    tokens: torch.Tensor
    """[B, TEXT, WIDTH]"""
    keep: torch.Tensor
    """[B, WIDTH]: what CFG's unconditional branch keeps of the row (like an edit's source image)."""

    def uncond_twin(self, uncond: FakeCond) -> FakeCond:
        """The empty prompt's tokens, this row's `keep`."""
        return FakeCond(uncond.tokens.expand(len(self), -1, -1), self.keep)


class TinyMixer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """v(x, t | tokens, keep): pixels and text mixed by Linear layers (LoRA targets: `to_in`, `to_mid`)."""

    @register_to_config
    def __init__(self, channels: int = CHANNELS, size: int = SIZE, width: int = WIDTH, hidden: int = 32):
        super().__init__()
        n = channels * size * size
        self.to_in = torch.nn.Linear(n + width + 1, hidden)
        self.to_mid = torch.nn.Linear(hidden, hidden)
        self.to_out = torch.nn.Linear(hidden, n)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The velocity of x [B, C, H, W] at timestep t [B] (t = 1 - sigma)."""
        h = torch.cat([x.flatten(1), tokens.mean(1) + keep, t[:, None]], dim=1)
        h = torch.nn.functional.silu(self.to_in(h))
        h = torch.nn.functional.silu(self.to_mid(h))
        return self.to_out(h).view_as(x)


class FakeEncoder:
    """Deterministic stand-in encoder: characters -> a fixed table."""

    identity = "fake-encoder:1"

    def encode(self, prompts: list[str]) -> FakeCond:
        """FakeCond of `prompts` ("" -> zeros)."""
        g = torch.Generator().manual_seed(7)
        table = torch.randn(128, WIDTH, generator=g)
        tokens = torch.zeros(len(prompts), TEXT, WIDTH)
        for i, p in enumerate(prompts):
            for j, ch in enumerate(p[:TEXT]):
                tokens[i, j] = table[ord(ch) % 128]
        keep = torch.stack([table[len(p) % 128] for p in prompts]) if prompts else torch.zeros(0, WIDTH)
        return FakeCond(tokens, keep)


class FakeBackend:
    """The `fake` family."""

    family = "fake"
    default_lora_targets = ("to_in", "to_mid")
    cond_type = FakeCond

    def preset_names(self) -> list[str]:
        """One preset."""
        return ["fake-tiny"]

    def config_problems(self, config: Any) -> list[str]:
        """Only its own preset."""
        if not config.model.path and config.model.preset != "fake-tiny":
            return [f"model.preset = {config.model.preset!r}; valid: fake-tiny"]
        return []

    def preflight(self, config: Any) -> list[str]:
        """Nothing to check."""
        return []

    def preset_spec(self, preset: str, latent_size: int = 0) -> ModelSpec:
        """The spec of fake-tiny."""
        return ModelSpec("fake", preset, {"channels": CHANNELS, "size": SIZE}, (CHANNELS, SIZE, SIZE), TEXT)

    def build(self, preset: str, seed: int, dtype: torch.dtype, latent_size: int = 0) -> tuple[TinyMixer, ModelSpec]:
        """A random TinyMixer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyMixer()
        return model.to(dtype), self.preset_spec(preset)

    def load(self, path: Path, dtype: torch.dtype, latent_size: int = 0,
             text_tokens: int = 0) -> tuple[TinyMixer, ModelSpec]:
        """A saved TinyMixer."""
        return TinyMixer.from_pretrained(str(path)).to(dtype), self.preset_spec("loaded")

    def source_image_problem(self, config: Any, size: tuple[int, int]) -> str:
        """No edit rows."""
        return "the fake family has no edit conditioning"

    def sigmas(self, steps: int, shift: float) -> torch.Tensor:
        """Its own schedule (no shift): linspace(1, 0, steps + 1)."""
        return torch.linspace(1.0, 0.0, steps + 1)

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: FakeCond) -> torch.Tensor:
        """v at t = 1 - sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return model(x, 1 - sigma, cond.tokens, cond.keep)

    def text_encoder(self, spec: str, model_spec: ModelSpec, max_sequence_length: int,
                     device: str | None = None) -> FakeEncoder:
        """The stand-in encoder (`builtin`)."""
        return FakeEncoder()

    def image_encoder(self, spec: str, model_spec: ModelSpec, device: str | None = None) -> Any:
        """No edit rows."""
        raise ValueError("the fake family has no edit conditioning")

    def vae(self, path: Path | None) -> None:
        """No VAE: latents are images."""
        return None

    def install_attention(self, model: torch.nn.Module, kind: str, backend: str) -> None:
        """No attention to fuse."""
        if kind != "reference":
            raise ValueError("the fake family has no attention")

    def forward_flops(self, spec: ModelSpec, lora_rank: int | None, lora_targets: Sequence[str],
                      edit: bool = False) -> float:
        """2 x the multiply-adds of the three Linear layers."""
        n = CHANNELS * SIZE * SIZE
        return 2.0 * ((n + WIDTH + 1) * 32 + 32 * 32 + 32 * n)

    def save_lora(self, directory: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                  weight_name: str) -> None:
        """PEFT-style keys under `fake.` with the config as metadata."""
        save_file({f"fake.{k}": v for k, v in state.items()}, str(directory / weight_name),
                  metadata={"lora_adapter_metadata": json.dumps(dict(metadata), default=str)})
