"""Named SD3 transformer architectures, built with random init when no local weights are given."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelPreset:
    """A named SD3 architecture: diffusers kwargs plus the shapes a run needs."""
    name: str
    transformer: dict = field(repr=False)
    """Keyword arguments of diffusers' `SD3Transformer2DModel`."""
    text_seq_len: int
    """Tokens of the prompt embedding sequence (SD3: 77 CLIP + 256 T5 = 333)."""
    latent_size: int
    """Default latent height = width (SD3: 1/8 of the pixel size; 64 at 512 px)."""

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (in_channels)."""
        return int(self.transformer["in_channels"])

    @property
    def joint_attention_dim(self) -> int:
        """Width of the prompt embedding sequence."""
        return int(self.transformer["joint_attention_dim"])

    @property
    def pooled_projection_dim(self) -> int:
        """Width of the pooled prompt embedding."""
        return int(self.transformer["pooled_projection_dim"])


PRESETS: dict[str, ModelPreset] = {
    # ~0.1 M parameters: one forward of a batch of 8 takes ~2 ms on 2 CPU cores. Layer 0 has the
    # dual (image-only) attention and the last block is context-pre-only, as in SD3.5.
    "tiny": ModelPreset(
        name="tiny",
        transformer=dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        text_seq_len=8,
        latent_size=8,
    ),
    # The real SD3.5-Medium transformer (2.5 B parameters), stabilityai/stable-diffusion-3.5-medium
    # transformer/config.json: 24 layers, 24 heads x 64, qk RMSNorm, dual attention in layers 0-12.
    "sd35-medium": ModelPreset(
        name="sd35-medium",
        transformer=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        text_seq_len=333,
        latent_size=64,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; KeyError listing the valid names."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]
