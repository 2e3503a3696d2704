"""Build the SD3 transformer: from a local diffusers-format dir, or a named preset with random init."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from engine.backends.sd3.presets import ModelPreset, get_preset
from engine.errors import ModelLoadError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
log = logging.getLogger(__name__)


def transformer_dir(path: str | Path) -> Path:
    """The dir holding the transformer's config.json: `path` itself or `path/transformer` (a pipeline dir)."""
    path = Path(path)
    for candidate in (path, path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"no transformer config.json in {path} or {path / 'transformer'}")


def _check_files(directory: Path) -> None:
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot parse {directory / 'config.json'}: {exc}") from exc
    if cfg.get("_class_name") not in (None, "SD3Transformer2DModel"):
        raise ModelLoadError(
            f"{directory / 'config.json'} describes a {cfg.get('_class_name')}, not an SD3 transformer"
        )
    if not any((directory / n).is_file() for n in WEIGHT_NAMES):
        raise ModelLoadError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_NAMES)}")


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    """Load from a local dir only (no hub); errors name the offending file.

    Refused, never silently mis-loaded: a file that differs from the dir's `SHA256SUMS` (when shipped with one,
    see `engine.checkpoint.write_sha256sums`), truncated/unreadable weights, weights missing for part of the model
    (diffusers would randomly initialise them with only a printed notice) or of the wrong shape, NaN/Inf values."""
    from engine.files import verify_sha256sums

    directory = transformer_dir(path)
    _check_files(directory)
    weights = ", ".join(str(directory / n) for n in WEIGHT_NAMES if (directory / n).is_file())
    if bad := verify_sha256sums(directory):
        raise ModelLoadError("; ".join(bad))
    try:
        model, info = SD3Transformer2DModel.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True,
                                                            use_safetensors=True,  # never a pickled .bin
                                                            output_loading_info=True)
    except Exception as exc:  # safetensors/diffusers raise many types for truncated or mismatched files
        raise ModelLoadError(f"cannot load the transformer weights in {directory} ({weights}): {exc}") from exc
    missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
    if missing or mismatched:
        raise ModelLoadError(f"{weights} does not match {directory / 'config.json'}: {len(missing)} weights missing "
                             f"(e.g. {sorted(missing)[:3]}), {len(mismatched)} of another shape "
                             f"(e.g. {list(mismatched)[:3]})")
    if info.get("unexpected_keys"):
        log.warning("%s: %d weights match no module of the model and were ignored (e.g. %s)", weights,
                    len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[:3])
    nonfinite = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if nonfinite:
        raise ModelLoadError(f"{weights}: {len(nonfinite)} tensors hold NaN/Inf (e.g. {nonfinite[:3]})")
    return model


def build_preset(preset: ModelPreset | str, seed: int = 0, dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    """A randomly initialised transformer of a named architecture (deterministic in `seed`)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**preset.transformer)
    return model if dtype == torch.float32 else model.to(dtype)


def preset_from_model(model: SD3Transformer2DModel, text_seq_len: int, latent_size: int | None = None) -> ModelPreset:
    """A ModelPreset describing a loaded model (for shapes: latent size/channels, text dims)."""
    cfg = dict(model.config)
    keys = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size", "dual_attention_layers", "qk_norm")
    return ModelPreset(name="loaded", transformer={k: cfg[k] for k in keys if k in cfg}, text_seq_len=text_seq_len,
                       latent_size=latent_size or int(cfg["sample_size"]))
