"""Named Z-Image transformer architectures (`ZImageTransformer2DModel` keyword arguments) and family constants.

The real architecture is read off the released `Tongyi-MAI/Z-Image-Turbo` `transformer/config.json` (diffusers
0.36 export): a single-stream DiT, 30 layers of dim 3840 (30 heads x 128 = sum(axes_dims) 32 + 48 + 48), two noise
and two context refiner blocks, qk RMSNorm, caption features of Qwen3-4B's width 2560, 16 latent channels (the
FLUX VAE), patch 2; 6,154,908,736 parameters (tests/test_zimage_backend.py builds it on the meta device and counts
them). The Omni variant (`Tongyi-MAI/Z-Image-Omni-Base`, the edit model of ZImageOmniPipeline) adds the SigLIP
branch with `siglip_feat_dim = 1152` (SigLIP2 so400m width; DiffSynth's model table registers the Omni DiT with
exactly that `extra_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILY = "zimage"

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
"""DanceOPD's Z-Image student targets (danceopd/backends/zimage_diffsynth.py:86 and configs/zimage_danceopd.yaml):
the attention projections and the SwiGLU feed-forward of every block (main layers and refiners alike; peft matches
module-name suffixes)."""

VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
"""Z-Image's FLUX VAE (`vae/config.json`): latents = (mode(E(x)) - shift) * scaling
(ZImageOmniPipeline.prepare_image_latents)."""

SCHEDULER_SHIFT = 3.0
"""`scheduler/scheduler_config.json` of Z-Image-Turbo (FlowMatchEulerDiscreteScheduler, no dynamic shifting)."""


@dataclass(frozen=True)
class ZImagePreset:
    """A named architecture: the transformer kwargs and the shapes the engine needs without building it."""

    name: str
    transformer: dict[str, Any] = field(repr=False)
    """Keyword arguments of diffusers' `ZImageTransformer2DModel`."""
    latent_size: int
    """Default latent height = width (the VAE downsamples by 8: 128 at 1024 px)."""
    text_tokens: int
    """Caption tokens of a typical prompt (FLOPs only)."""
    siglip_tokens: int = 0
    """SigLIP tokens of one source image (the processor's `max_num_patches`; 0 = no SigLIP branch)."""

    @property
    def latent_channels(self) -> int:
        """Latent channels (16 for the FLUX VAE)."""
        return int(self.transformer["in_channels"])

    @property
    def cap_feat_dim(self) -> int:
        """Caption feature width the text encoder must produce."""
        return int(self.transformer["cap_feat_dim"])


_TURBO: dict[str, Any] = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    siglip_feat_dim=None,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=(32, 48, 48),
    axes_lens=(1536, 512, 512),
)

PRESETS: dict[str, ZImagePreset] = {
    # 0.65 M parameters, half of them the timestep MLP (diffusers fixes its hidden width at 1024). Image 3x16x16
    # with patch 2 = 64 tokens, exactly two SEQ_MULTI_OF (32) blocks, so no image padding. On 1 CPU thread a
    # batch-32 edit step (source + target + prompt = 160 tokens) takes 0.38 s fwd+bwd, a T2I step 0.21 s.
    "zimage-tiny": ZImagePreset(
        name="zimage-tiny",
        # the Turbo DiT's settings at toy width and depth
        transformer={**_TURBO, "in_channels": 3, "dim": 64, "n_layers": 3, "n_refiner_layers": 1, "n_heads": 4,
                     "n_kv_heads": 4, "cap_feat_dim": 32, "axes_dims": (4, 6, 6), "axes_lens": (512, 32, 32)},
        latent_size=16,
        text_tokens=32,
    ),
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json (T2I; its DiT takes the Omni token list too, without SigLIP).
    "zimage-turbo": ZImagePreset(name="zimage-turbo", transformer=_TURBO, latent_size=128, text_tokens=512),
    # Tongyi-MAI/Z-Image-Omni-Base: the same DiT plus the SigLIP branch (siglip_feat_dim 1152); 256 SigLIP tokens
    # per source image (Siglip2 naflex max_num_patches).
    "zimage-omni": ZImagePreset(name="zimage-omni", transformer={**_TURBO, "siglip_feat_dim": 1152}, latent_size=128,
                                text_tokens=512, siglip_tokens=256),
}


def get_preset(name: str) -> ZImagePreset:
    """The preset called `name`; KeyError listing the valid names."""
    if name not in PRESETS:
        raise KeyError(f"unknown Z-Image preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
