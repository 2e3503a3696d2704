"""`ZImageBackend`: the Z-Image family behind the engine's `ModelBackend` protocol (engine/backends/base.py).

Everything goes through diffusers' own classes: `ZImageTransformer2DModel` (basic mode for text-to-image rows, its
Omni mode for edit rows: engine/backends/zimage/forward.py), `AutoencoderKL` with Z-Image's shift/scaling, the
pipeline's tokenizer + text encoder, `Siglip2VisionModel` + its processor, and `ZImageLoraLoaderMixin`'s LoRA file
format. Family specifics the engine must not assume from SD3:
- schedule: `sigmas(steps)` is ZImagePipeline's `linspace(1, 1/n, n)` shifted once by the scheduler's shift (3.0
  for Turbo), not SD3's doubly-shifted training grid (`engine.sampling.schedule.flow_match_sigmas`);
- timestep t = 1 - sigma and the sign-flipped output (forward.py);
- CFG scale: Z-Image pipelines' `guidance_scale` g is the engine's a = g + 1;
- attention: single-stream blocks (one token sequence of caption + images), so SD3's fused *joint* attention
  processor does not apply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import ModelSpec, TensorCond, TextEncoder
from engine.backends.zimage.cond import ZImageCond
from engine.backends.zimage.encoders import (
    HashPromptEncoder,
    PixelImageEncoder,
    QwenPromptEncoder,
    SourceEncoder,
    SourceImages,
    ZImageVAE,
    load_component,
)
from engine.backends.zimage.flops import forward_flop_parts
from engine.backends.zimage.forward import zimage_velocity
from engine.backends.zimage.presets import FAMILY, LORA_TARGETS, PRESETS, SCHEDULER_SHIFT, get_preset

if TYPE_CHECKING:
    from engine.config.schema import Config

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
CLASS_NAME = "ZImageTransformer2DModel"
ATTENTION_KINDS = ("reference",)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MIN_SOURCE_SIDE = 64
"""ZImageOmniPipeline checks every condition image with Flux2ImageProcessor.check_image_input (min_side_length 64)."""


class ZImageLoadError(RuntimeError):
    """A local Z-Image dir that cannot be loaded as asked (names the file)."""


def transformer_dir(path: Path) -> Path:
    """`path` itself (a transformer dir) or `path/transformer` (a pipeline dir): the dir with config.json."""
    for candidate in (path, path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ZImageLoadError(f"no transformer config.json in {path} or {path / 'transformer'}")


def read_transformer_config(directory: Path) -> dict[str, Any]:
    """The transformer config.json of `directory`; ZImageLoadError naming the file when unreadable or not Z-Image."""
    file = directory / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZImageLoadError(f"cannot parse {file}: {exc}") from exc
    if cfg.get("_class_name") not in (None, CLASS_NAME):
        raise ZImageLoadError(f"{file} describes a {cfg.get('_class_name')}, not a {CLASS_NAME}")
    return cfg


def _latent_problems(cfg: Mapping, latent_size: int, where: str) -> list[str]:
    patch = int(cfg["all_patch_size"][0])
    out = []
    if latent_size % patch:
        out.append(f"model.latent_size = {latent_size} is not a multiple of the patch size {patch} ({where})")
    lens = list(cfg.get("axes_lens", (1024, 512, 512)))
    if latent_size // patch > min(lens[1], lens[2]):
        out.append(f"model.latent_size = {latent_size}: {latent_size // patch} patches per side exceed the RoPE "
                   f"table axes_lens {lens[1:]} ({where})")
    return out


def _default_latent(cfg: Mapping) -> int:
    """128 (1024 px through the FLUX VAE), or the largest latent the RoPE table of a smaller model covers."""
    patch, lens = int(cfg["all_patch_size"][0]), list(cfg.get("axes_lens", (1024, 512, 512)))
    return min(128, patch * min(lens[1], lens[2]))


def _spec(cfg: Mapping, name: str, latent_size: int, text_tokens: int) -> ModelSpec:
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    return ModelSpec(family=FAMILY, name=name, config=config,
                     latent_shape=(int(cfg["in_channels"]), latent_size, latent_size), text_tokens=text_tokens)


class ZImageBackend:
    """The Z-Image model family (`model.family = "zimage"`)."""

    family = FAMILY
    default_lora_targets = LORA_TARGETS
    cond_type = ZImageCond

    # ------------------------------------------------------------------------------------------------ presets

    def preset_names(self) -> list[str]:
        """zimage-tiny (tests, the editing world), zimage-turbo, zimage-omni (the released architectures)."""
        return sorted(PRESETS)

    def preset_spec(self, preset: str, latent_size: int = 0) -> ModelSpec:
        """The spec of `preset` without building it (KeyError listing the valid names)."""
        p = get_preset(preset)
        return _spec(p.transformer, preset, latent_size or p.latent_size, p.text_tokens)

    def sigmas(self, steps: int, shift: float = SCHEDULER_SHIFT) -> torch.Tensor:
        """ZImagePipeline's schedule: shift(linspace(1, 1/n, n)) + [0], float32, length steps + 1
        (`get_default_z_image_sigmas` + FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...) without dynamic
        shifting; tests compare it with the scheduler bit for bit)."""
        import numpy as np

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = np.array(torch.linspace(1.0, 1.0 / steps, steps).tolist()).astype(np.float32)
        s = shift * s / (1 + (shift - 1) * s)
        return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])

    # ------------------------------------------------------------------------------------------------- checks

    def config_problems(self, config: Config) -> list[str]:
        """Presets, the latent size against patch size and RoPE table, attention kinds, CUDA-graph rollouts."""
        m = config.model
        out: list[str] = []
        path, preset = getattr(m, "path", ""), getattr(m, "preset", "")
        latent = int(getattr(m, "latent_size", 0) or 0)
        if not path and preset not in PRESETS:
            out.append(f"model.preset = {preset!r}; valid for family {FAMILY!r}: {', '.join(sorted(PRESETS))} "
                       f"(or set model.path)")
        elif not path and latent:
            out += _latent_problems(PRESETS[preset].transformer, latent, f"preset {preset!r}")
        attention = getattr(m, "attention", "reference")
        if attention not in ATTENTION_KINDS:
            out.append(f"model.attention = {attention!r}: {FAMILY} supports {list(ATTENTION_KINDS)} ("
                       + self._fused_reason() + ")")
        if getattr(getattr(config, "kernels", None), "cuda_graphs", False):
            out.append("kernels.cuda_graphs = true: Z-Image's forward takes Python lists per row and reads caption and "
                       "image lengths on the host (`.tolist()`, transformer_z_image.py patchify_and_embed), so a "
                       "denoising step cannot be captured as a CUDA graph; use kernels.cuda_graphs = false")
        return out

    def source_image_problem(self, config: Config, size: tuple[int, int]) -> str:
        """A source for the pipeline's VAE (data.encoder a pipeline dir) needs >= 64 px a side (ZImageOmniPipeline's
        check_image_input); the builtin / a world's pixel encoder resizes any image."""
        from engine.worlds import find_world

        encoder = str(getattr(getattr(config, "data", None), "encoder", "builtin") or "builtin")
        if encoder == "builtin" or find_world(encoder) is not None:
            return ""
        if min(size) < MIN_SOURCE_SIDE:
            return (f"{size[0]}x{size[1]} px: Z-Image needs >= {MIN_SOURCE_SIDE} px a side (ZImageOmniPipeline checks "
                    f"condition images with Flux2ImageProcessor.check_image_input)")
        return ""

    def preflight(self, config: Config) -> list[str]:
        """The student's targets on the real architecture (meta device), the text encoder's width vs cap_feat_dim."""
        from engine.config.io import resolve_path  # `<world>:` paths (a miniature world's shipped base)
        from engine.worlds import find_world

        m = config.model
        out: list[str] = []
        cfg: Mapping[str, Any]
        if getattr(m, "path", ""):
            try:
                cfg = read_transformer_config(transformer_dir(resolve_path(m.path)))
            except ZImageLoadError as exc:
                return [str(exc)]
            if getattr(m, "latent_size", 0):
                out += _latent_problems(cfg, int(m.latent_size), str(m.path))
        elif getattr(m, "preset", "") in PRESETS:
            cfg = PRESETS[m.preset].transformer
        else:
            return out
        student = getattr(config, "student", None)
        targets = list(getattr(student, "targets", []) or []) or list(LORA_TARGETS)
        names = self._module_names(cfg)
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            out.append(f"student.targets {missing} match no module of the Z-Image transformer (valid e.g. "
                       f"{list(LORA_TARGETS)})")
        encoder = str(getattr(getattr(config, "data", None), "encoder", "") or "")
        if encoder and encoder != "builtin" and find_world(encoder) is None:
            te = Path(encoder) / "text_encoder" / "config.json"
            if not te.is_file():
                out.append(f"data.encoder = {encoder!r}: {te} not found (a Z-Image pipeline dir, or 'builtin')")
            else:
                width = json.loads(te.read_text()).get("hidden_size")
                if width is not None and int(width) != int(cfg["cap_feat_dim"]):
                    out.append(f"{te}: text encoder width {width} != transformer cap_feat_dim {cfg['cap_feat_dim']}")
        return out

    @staticmethod
    def _module_names(cfg: Mapping[str, Any]) -> list[str]:
        from diffusers import ZImageTransformer2DModel

        kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**kwargs)
        return [n for n, _ in model.named_modules()]

    # ------------------------------------------------------------------------------------------ build / load

    def build(self, preset: str, seed: int, dtype: torch.dtype, latent_size: int = 0) -> tuple[torch.nn.Module,
                                                                                                ModelSpec]:
        """A randomly initialised ZImageTransformer2DModel of `preset` (deterministic in `seed`) and its spec."""
        from diffusers import ZImageTransformer2DModel

        p = get_preset(preset)
        latent = latent_size or p.latent_size
        if problems := _latent_problems(p.transformer, latent, f"preset {preset!r}"):
            raise ValueError("; ".join(problems))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ZImageTransformer2DModel(**p.transformer)
        model = model if dtype == torch.float32 else model.to(dtype)
        return model, _spec(p.transformer, preset, latent, p.text_tokens)

    def load(self, path: Path, dtype: torch.dtype, latent_size: int = 0,
             text_tokens: int = 0) -> tuple[torch.nn.Module, ModelSpec]:
        """Strict local load: a file differing from the dir's SHA256SUMS, missing or mis-shaped weights and NaN/Inf
        values are refused with the file named (diffusers alone would randomly initialise missing weights)."""
        from diffusers import ZImageTransformer2DModel

        from engine.files import verify_sha256sums

        directory = transformer_dir(Path(path))
        cfg = read_transformer_config(directory)
        files = [directory / n for n in WEIGHT_NAMES if (directory / n).is_file()]
        if not files:
            raise ZImageLoadError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_NAMES)}")
        if bad := verify_sha256sums(directory):
            raise ZImageLoadError("; ".join(bad))
        weights = ", ".join(map(str, files))
        try:
            model, info = ZImageTransformer2DModel.from_pretrained(str(directory), dtype=dtype,
                                                                   local_files_only=True, output_loading_info=True)
        except Exception as exc:  # safetensors/diffusers raise many types for truncated or mismatched files
            raise ZImageLoadError(f"cannot load the transformer weights in {weights}: {exc}") from exc
        missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
        if missing or mismatched:
            raise ZImageLoadError(f"{weights} does not match {directory / 'config.json'}: {len(missing)} weights "
                                  f"missing (e.g. {sorted(missing)[:3]}), {len(mismatched)} of another shape")
        if info.get("unexpected_keys"):
            log.warning("%s: %d weights match no module and were ignored (e.g. %s)", weights,
                        len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[:3])
        nonfinite = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if nonfinite:
            raise ZImageLoadError(f"{weights}: {len(nonfinite)} tensors hold NaN/Inf (e.g. {nonfinite[:3]})")
        latent = latent_size or _default_latent(cfg)
        if problems := _latent_problems(cfg, latent, str(directory)):
            raise ZImageLoadError("; ".join(problems))
        return model, _spec(dict(model.config), "loaded", latent, text_tokens)

    # ----------------------------------------------------------------------------------------------- forward

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: TensorCond) -> torch.Tensor:
        """v(x, sigma | cond) of T2I and edit rows (forward.py: t = 1 - sigma, output negated)."""
        if not isinstance(cond, ZImageCond):
            raise TypeError(f"the Z-Image backend needs a ZImageCond, got {type(cond).__name__}")
        return zimage_velocity(model, x, sigma, cond)

    # -------------------------------------------------------------------------------------- encoders / VAE

    def text_encoder(self, spec: str, model_spec: ModelSpec, max_sequence_length: int,
                     device: str | None = None) -> TextEncoder:
        """`builtin`: HashPromptEncoder of the model's caption width; else the Qwen tokenizer + text encoder of the
        local pipeline dir `spec` (its SigLIP processor, when present and the model has a SigLIP branch, fixes the
        SigLIP capacity of the rows)."""
        siglip_dim = int(model_spec.config.get("siglip_feat_dim") or 0)
        if spec == "builtin":
            return HashPromptEncoder(int(model_spec.config["cap_feat_dim"]), model_spec.latent_shape,
                                     max_sequence_length)
        path = Path(spec)
        tokens = 0
        if siglip_dim:
            proc = path / "siglip_processor" / "preprocessor_config.json"
            tokens = int(json.loads(proc.read_text()).get("max_num_patches", 256)) if proc.is_file() else 256
        encoder = QwenPromptEncoder.from_dir(path, max_sequence_length, model_spec.latent_shape, tokens, siglip_dim)
        encoder.text_encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return encoder

    def vae(self, path: Path | None) -> ZImageVAE | None:
        """The pipeline dir's `vae/` with Z-Image's shift and scaling (None without one)."""
        if path is None or not (Path(path) / "vae").is_dir():
            return None
        return ZImageVAE(load_component(Path(path), "vae"))

    def source_encoder(self, path: Path, model_spec: ModelSpec) -> SourceEncoder:
        """VAE + SigLIP of a pipeline dir for edit rows (SigLIP only when the transformer has the branch)."""
        return SourceEncoder.from_dir(Path(path), siglip=bool(model_spec.config.get("siglip_feat_dim")))

    def image_encoder(self, spec: str, model_spec: ModelSpec, device: str | None = None
                      ) -> PixelImageEncoder | SourceImages:
        """`builtin`: the pixel encoder (models whose latents are RGB pixels); a pipeline dir: its VAE (+ SigLIP),
        every source resized to the training size = latent size x the VAE factor (DanceOPD, zimage_diffsynth.py:457)."""
        if spec == "builtin":
            return PixelImageEncoder(model_spec.latent_shape)
        sources = self.source_encoder(Path(spec), model_spec)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        sources.vae.vae.to(dev)
        if sources.siglip is not None:
            sources.siglip.to(dev)
        f = sources.vae.scale_factor
        size = (int(model_spec.latent_shape[2]) * f, int(model_spec.latent_shape[1]) * f)
        identity = f"zimage-source:{Path(spec).resolve()}:{size[0]}x{size[1]}:siglip{sources.siglip_tokens}"
        return SourceImages(sources, size, identity)

    # ----------------------------------------------------------------------------------------- attention

    @staticmethod
    def _fused_reason() -> str:
        return ("SD3's LoRA-fused joint attention (engine/backends/sd3/attention.py) fuses the two streams of an MMDiT "
                "block; Z-Image blocks are single-stream (one caption+image sequence with RoPE and per-token masks), "
                "so it does not apply: use model.attention = 'reference'")

    def install_attention(self, model: torch.nn.Module, kind: str, backend: str) -> None:
        """`reference` keeps diffusers' ZSingleStreamAttnProcessor; with `backend` other than sdpa, diffusers'
        attention dispatcher backend of that name (e.g. `flash`) is selected. `fused` is refused."""
        if kind == "fused":
            raise ValueError(f"model.attention = 'fused' is not available for Z-Image: {self._fused_reason()}")
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"model.attention = {kind!r}; valid for Z-Image: {list(ATTENTION_KINDS)}")
        if backend and backend != "sdpa":
            model.set_attention_backend(backend)

    # --------------------------------------------------------------------------------------------- FLOPs

    def forward_flops(self, spec: ModelSpec, lora_rank: int | None, lora_targets: Sequence[str],
                      edit: bool = False, siglip_tokens: int = 0) -> float:
        """Model FLOPs of one row (flops.py): T2I with one caption of `spec.text_tokens`, or with `edit` a clean
        source + target and three caption segments (the prompt's plus two short template segments of 32 padded
        tokens each) and `siglip_tokens` SigLIP tokens."""
        text = spec.text_tokens or 1
        hw = (int(spec.latent_shape[1]), int(spec.latent_shape[2]))
        caps = [1, text, 1] if edit else [text]
        parts = forward_flop_parts(spec.config, hw, caps, edit=edit, siglip_tokens=siglip_tokens,
                                   lora_rank=lora_rank, lora_targets=lora_targets if lora_rank else ())
        return parts["total"]

    # ------------------------------------------------------------------------------------------------ LoRA

    def save_lora(self, directory: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                  weight_name: str = LORA_WEIGHT_NAME) -> None:
        """diffusers' Z-Image LoRA file (`ZImageLoraLoaderMixin.save_lora_weights`: keys `transformer.<module>.
        lora_{A,B}.weight`, the adapter config as `lora_adapter_metadata`), which `ZImagePipeline.load_lora_weights`
        and `ZImageTransformer2DModel.load_lora_adapter` read back with the true alpha."""
        from diffusers import ZImagePipeline

        ZImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=dict(state),
                                         transformer_lora_adapter_metadata=dict(metadata), weight_name=weight_name)
