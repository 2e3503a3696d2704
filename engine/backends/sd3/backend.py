"""`SD3Backend`: SD3 / SD3.5 behind the `ModelBackend` protocol (diffusers' `SD3Transformer2DModel`).

Conventions it owns: the timestep is `1000 sigma` (FlowMatchEulerDiscreteScheduler's num_train_timesteps), the
conditioning is `SD3Cond(prompt_embeds, pooled)`, the unconditional prompt is the empty prompt's embeddings, LoRA
targets are the 8 joint-attention projections (as the public Flow-GRPO experts), latents are (16, H/8, W/8).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import ModelSpec, TextEncoder
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import PRESETS, ModelPreset

if TYPE_CHECKING:
    from engine.backends.sd3.vae import SD3VAE
    from engine.config.schema import Config

TIMESTEP_SCALE = 1000.0  # SD3 is conditioned on t = sigma * num_train_timesteps
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
_SPEC_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
              "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's `timestep` input for a noise level."""
    return sigma * TIMESTEP_SCALE


def predict_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
    """v(x, sigma | cond) of the transformer with whatever adapter is active; sigma is [B] (or scalar).

    The timestep stays float32 whatever the model dtype, as StableDiffusion3Pipeline passes the scheduler's
    timesteps: diffusers' `Timesteps` projection runs in float32 and casts only its sinusoidal output to the
    weights' dtype. A bf16 timestep would move 913.35 (sigma 0.913 of the 10-step shift-3 schedule) to 912 and
    the embedding by up to 41% (DESIGN §1); the experts were trained with float32 t.
    """
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    dtype = next(model.parameters()).dtype
    out = model(
        hidden_states=x.to(dtype),
        encoder_hidden_states=cond.prompt_embeds.to(dtype),
        pooled_projections=cond.pooled.to(dtype),
        timestep=sigma_to_timestep(sigma),
        return_dict=False,
    )[0]
    return out


def spec_of(preset: ModelPreset, latent_size: int = 0) -> ModelSpec:
    """The ModelSpec of an SD3 architecture (preset or read from a model) at `latent_size` (0 = its default)."""
    size = latent_size or preset.latent_size
    return ModelSpec(family="sd3", name=preset.name, config=dict(preset.transformer),
                     latent_shape=(preset.latent_channels, size, size), text_tokens=preset.text_seq_len)


def _latent_fits(latent_size: int, transformer: Mapping[str, Any], what: str) -> list[str]:
    """SD3's positional embedding covers pos_embed_max_size patches per side (measured: latent 18 on `tiny`,
    max 8 x patch 2 = 16, fails at the first forward with "Height (9) cannot be greater than pos_embed_max_size")."""
    limit = int(transformer.get("pos_embed_max_size") or 0) * int(transformer.get("patch_size", 1))
    if latent_size and limit and latent_size > limit:
        return [f"model.latent_size = {latent_size}; {what} supports at most {limit} (pos_embed_max_size x patch_size)"]
    return []


def _encoder_widths(config: Config) -> tuple[int, int, str] | str:
    """(prompt embedding width, pooled width, what) of `data.encoder` without loading encoder weights, or a problem.
    `builtin` is sized from the preset, so it always fits one."""
    from engine.backends.sd3.encoders import SD3TextEncoder
    from engine.config.io import resolve_path
    from engine.worlds import find_world

    spec = config.data.encoder
    if spec == "builtin":
        if config.model.path:
            return (f"data.encoder = 'builtin' fits only the model presets (its widths are the preset's); with "
                    f"model.path = {config.model.path!r} set data.encoder to the model's pipeline dir or a world's "
                    f"encoder")
        return ""
    world = find_world(spec)
    if world is not None:  # a miniature world's encoder is small by design: encode the empty prompt for its shapes
        try:
            cond = world.encoder().encode([""])
        except (OSError, ValueError, RuntimeError) as exc:
            return f"data.encoder = {spec!r}: cannot load the world's text encoder: {exc}"
        return int(cond.prompt_embeds.shape[-1]), int(cond.pooled.shape[-1]), f"the {spec!r} world's encoder"
    if not resolve_path(spec).exists():
        return ""  # reported by engine.config.preflight.check_paths
    if not resolve_path(spec).is_dir():
        return f"data.encoder = {spec!r}: not builtin, not a miniature world and not a local SD3 pipeline dir"
    if config.data.max_sequence_length > 512:  # the pipeline could never sample a student trained on longer prompts
        return (f"data.max_sequence_length = {config.data.max_sequence_length}; StableDiffusion3Pipeline refuses more "
                f"than 512 T5 tokens (diffusers pipeline_stable_diffusion_3.py check_inputs)")
    try:
        enc = SD3TextEncoder(resolve_path(spec), config.data.max_sequence_length, device="cpu")
    except (OSError, KeyError, ValueError) as exc:  # missing sub-dirs or configs; only config.json files are read
        return f"data.encoder = {spec!r}: {exc}"
    return enc.dim, enc.pooled_dim, f"the text encoders of {spec} (T5 d_model, CLIP-L + CLIP-G projection_dim)"


def _encoder_problems(config: Config, transformer: Mapping[str, Any], where: str) -> list[str]:
    """The text encoder's output widths must be the transformer's input widths (else: a bare matmul error at the
    first forward)."""
    widths = _encoder_widths(config)
    if isinstance(widths, str):
        return [widths] if widths else []
    embed, pooled, what = widths
    want = (int(transformer.get("joint_attention_dim", embed)), int(transformer.get("pooled_projection_dim", pooled)))
    if (embed, pooled) == want:
        return []
    return [f"data.encoder = {config.data.encoder!r}: {what} gives prompt embeddings {embed} wide and pooled "
            f"embeddings {pooled} wide; the model ({where}) takes joint_attention_dim = {want[0]}, "
            f"pooled_projection_dim = {want[1]}"]


class SD3Backend:
    """SD3 / SD3.5 (MMDiT). Heavy modules (diffusers) are imported inside the methods."""

    family = "sd3"
    default_lora_targets = DEFAULT_TARGETS
    cond_type = SD3Cond

    def preset_names(self) -> list[str]:
        """tiny (tests), sd35-medium (the real architecture, random init)."""
        return sorted(PRESETS)

    def config_problems(self, config: Config) -> list[str]:
        """Presets, latent size against the preset's positional embedding, the builtin encoder's reach."""
        m, p = config.model, []
        if not m.path and m.preset not in PRESETS:
            p.append(f"model.preset = {m.preset!r}; valid: {', '.join(sorted(PRESETS))} (or set model.path)")
        elif not m.path:
            p.extend(_latent_fits(m.latent_size, PRESETS[m.preset].transformer, f"preset {m.preset!r}"))
        return p

    def model_config(self, config: Config) -> tuple[dict[str, Any] | None, str]:
        """The transformer config of `config`'s model (preset kwargs, or the dir's config.json) and where it is
        from; (None, reason) when it cannot be read (the loader then reports it, naming the file)."""
        from engine.config.io import resolve_path

        if not config.model.path:
            preset = PRESETS.get(config.model.preset)
            return (dict(preset.transformer), f"preset {config.model.preset!r}") if preset else (None, "")
        model_dir = resolve_path(config.model.path)
        cfg_file = next((d / "config.json" for d in (model_dir, model_dir / "transformer")
                         if (d / "config.json").is_file()), None)
        try:
            data = json.loads(cfg_file.read_text()) if cfg_file else None
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            return None, ""
        return {k: v for k, v in data.items() if not k.startswith("_")}, str(cfg_file)

    def preflight(self, config: Config) -> list[str]:
        """Each student target must name a Linear layer of the model (peft's rule: the module's name is the target or
        ends with '.' + target); the model is built on the meta device (no memory, ~0.5 s for SD3.5-M)."""
        transformer, where = self.model_config(config)
        if transformer is None:
            return []
        problems = _latent_fits(config.model.latent_size, transformer, where) if config.model.path else []
        problems += _encoder_problems(config, transformer, where)
        if not config.student.targets:
            return problems
        from diffusers import SD3Transformer2DModel

        try:
            with torch.device("meta"):
                model = SD3Transformer2DModel(**transformer)
        except (TypeError, ValueError) as exc:
            return [*problems, f"model: cannot build the transformer from its config: {exc}"]
        linear = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
        def hit(name: str, target: str) -> bool:
            return name == target or name.endswith("." + target)

        targeted = [mod for n, mod in linear.items() if any(hit(n, t) for t in config.student.targets)]
        missing = [t for t in config.student.targets if not any(hit(n, t) for n in linear)]
        if missing:
            problems.append(f"student.targets: {missing} match no Linear layer of the model (e.g. to_q, to_k, to_v, "
                            f"to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, ff.net.0.proj)")
        if targeted:  # B A has rank <= min(in, out): a larger rank only adds parameters (and a typo'd huge one OOMs)
            top = max(min(m.in_features, m.out_features) for m in targeted)
            for where_rank, rank in [("student.rank", config.student.rank)] + [
                    (f"teachers[{i}].rank", t.rank) for i, t in enumerate(config.teachers) if t.random_seed >= 0]:
                if rank > top:
                    problems.append(f"{where_rank} = {rank}; must be <= {top}, the widest targeted layer's "
                                    f"min(in, out) features (a LoRA B A cannot have a higher rank)")
        return problems

    def preset_spec(self, preset: str, latent_size: int = 0) -> ModelSpec:
        """The spec of preset `preset` (KeyError listing the valid names)."""
        from engine.backends.sd3.presets import get_preset

        return spec_of(get_preset(preset), latent_size)

    def build(self, preset: str, seed: int, dtype: torch.dtype, latent_size: int = 0) -> tuple[torch.nn.Module,
                                                                                                ModelSpec]:
        """A randomly initialised transformer of `preset` (deterministic in `seed`) and its spec."""
        from engine.backends.sd3.loading import build_preset
        from engine.backends.sd3.presets import get_preset

        p = get_preset(preset)
        return build_preset(p, seed, dtype), spec_of(p, latent_size)

    def load(self, path: Path, dtype: torch.dtype, latent_size: int = 0,
             text_tokens: int = 0) -> tuple[torch.nn.Module, ModelSpec]:
        """The transformer of a local dir (strict: SHA256SUMS, missing keys, NaN; errors name the file)."""
        from engine.backends.sd3.loading import load_transformer, preset_from_model

        model = load_transformer(path, dtype)
        return model, spec_of(preset_from_model(model, text_tokens, latent_size or None))

    def sigmas(self, steps: int, shift: float) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler(shift)'s sigmas (engine.sampling.schedule, bit-identical to diffusers)."""
        from engine.sampling.schedule import flow_match_sigmas

        return flow_match_sigmas(steps, shift)

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 cond: SD3Cond) -> torch.Tensor:  # type: ignore[override]
        """v(x, sigma | cond): the transformer at timestep 1000 sigma."""
        return predict_velocity(model, x, sigma, cond)

    def text_encoder(self, spec: str, model_spec: ModelSpec, max_sequence_length: int,
                     device: str | None = None) -> TextEncoder:
        """`builtin` (the hash encoder, sized for the model's preset) or a local SD3 pipeline dir."""
        from engine.backends.sd3.encoders import HashTextEncoder, SD3TextEncoder

        if spec == "builtin":
            if model_spec.name not in PRESETS:
                raise ValueError("data.encoder = 'builtin' needs a model preset (it only fits tiny test models)")
            cfg = model_spec.config
            return HashTextEncoder(model_spec.text_tokens, int(cfg["joint_attention_dim"]),
                                   int(cfg["pooled_projection_dim"]))
        if not Path(spec).is_dir():
            raise ValueError(f"data.encoder = {spec!r}: not builtin and not a local SD3 pipeline dir")
        return SD3TextEncoder(spec, max_sequence_length, device)

    def image_encoder(self, spec: str, model_spec: ModelSpec, device: str | None = None) -> Any:
        """SD3 has no edit conditioning: ValueError."""
        raise ValueError(f"model.family = {self.family!r} has no edit conditioning (no source images); use zimage")

    def source_image_problem(self, config: Config, size: tuple[int, int]) -> str:
        """Every source image: SD3 cannot condition on one."""
        return f"model.family = {self.family!r} has no edit conditioning (source images need e.g. zimage)"

    def vae(self, path: Path | None) -> SD3VAE | None:
        """The pipeline dir's `vae/` (None without a pipeline dir: presets and transformer-only dirs)."""
        from engine.backends.sd3.vae import SD3VAE

        if path is None or not (Path(path) / "vae" / "config.json").is_file():
            return None
        return SD3VAE.from_dir(Path(path))

    def install_attention(self, model: torch.nn.Module, kind: str, backend: str) -> None:
        """`fused`: the LoRA-fused joint-attention processor (engine/backends/sd3/attention.py); `reference`: as
        loaded (diffusers' JointAttnProcessor2_0 with peft's LoRA layers), its SDPA call under `backend`'s kernel
        choice unless that is `sdpa` (torch's own)."""
        from engine.backends.sd3.attention import install_attention, install_reference

        if kind == "fused":
            install_attention(model, backend=backend)  # FLOWOPD_BACKEND[_JOINT_ATTENTION]=torch: diffusers' processor
        elif backend != "sdpa":
            install_reference(model, backend)

    def forward_flops(self, spec: ModelSpec, lora_rank: int | None, lora_targets: Sequence[str],
                      edit: bool = False) -> float:
        """MMDiT forward FLOPs per image (engine/backends/sd3/flops.py), LoRA on the attention projections."""
        if edit:
            raise ValueError("SD3 has no edit rows")
        from engine.backends.sd3.flops import Lora, MMDiTDims, forward_flops

        lora = None if lora_rank is None else Lora(lora_rank, tuple(lora_targets))
        return forward_flops(MMDiTDims.from_config(spec.config), spec.latent_shape[-1], spec.text_tokens, lora).total

    def save_lora(self, directory: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                  weight_name: str) -> None:
        """diffusers' own writer: keys `transformer.<module>.lora_{A,B}.weight`, the adapter config as metadata."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=dict(state),
                                                   transformer_lora_adapter_metadata=dict(metadata),
                                                   weight_name=weight_name)
