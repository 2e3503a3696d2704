"""The model-family seam: what generic engine code may ask of a model family (DESIGN §2).

A family (SD3, Z-Image, ...) is one folder under `engine/backends/` holding a `ModelBackend` and registered with
one line (`engine/backends/__init__.py`); nothing outside that folder names the family's model class, its
conditioning fields, its timestep convention or its LoRA target names. Generic code (trainer, fields, rollouts,
objective, eval) sees only:

- `ModelBackend`: presets, loading from a local diffusers dir, the velocity v(x, sigma | cond), the text encoder,
  the VAE, default LoRA targets, the latent shape, attention installation, FLOPs and per-family config checks;
- a `TensorCond` subclass as the conditioning of a batch: batch-first tensors that generic code indexes,
  concatenates, moves and copies field by field without knowing what the fields mean. `uncond_twin` says what the
  unconditional branch of classifier-free guidance keeps (SD3: nothing of the row; an edit: the source image).

Edit rows (a reference image conditions the row: DanceOPD's editing fields) take three more pieces, all optional
for a family without edit conditioning: an encoder with `encode_edit(prompts)` (the caption rows of edit prompts,
`EditTextEncoder`), an `ImageEncoder` (source images -> the image tensors of the row, cached once per image like
prompt embeddings) and `TensorCond.with_images` (captions + images -> edit rows). `forward_groups` says which rows
the family runs as separate forwards (Z-Image: text-to-image and edit rows are different forward modes), so a
batched evaluator can give each group its own segment metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch

from engine.transfer import to_device

if TYPE_CHECKING:
    from engine.config.schema import Config

C = TypeVar("C", bound="TensorCond")


@dataclass(frozen=True)
class TensorCond:
    """Conditioning of a batch: a dataclass whose fields are all tensors with the batch on dim 0.

    Subclasses declare the fields (`prompt_embeds`, `pooled`, a source latent, ...); every operation below works
    field by field, so generic code never names them. Floating fields follow `to(dtype=...)`; integer fields (token
    counts, masks) keep their dtype.
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields by name (the prompt cache stores exactly these, one safetensors entry each)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_tensors(cls: type[C], tensors: Mapping[str, torch.Tensor]) -> C:
        """The inverse of `tensors()`; raises KeyError naming a missing field."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"{cls.__name__} needs tensors {names}; missing {missing}")
        return cls(**{n: tensors[n] for n in names})

    def _map(self: C, fn: Any) -> C:
        return type(self)(**{k: fn(v) for k, v in self.tensors().items()})

    def __len__(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    def __getitem__(self: C, idx: torch.Tensor | slice | Sequence[int]) -> C:
        """Rows `idx` of every field."""
        return self._map(lambda t: t[idx])

    def to(self: C, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> C:
        """Every field on `device`; floating fields also in `dtype`. `non_blocking`: a CPU -> CUDA move goes through
        pinned memory without blocking the host (engine.transfer.to_device)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if non_blocking and device is not None:
                t = to_device(t, device)
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return self._map(move)

    def expand(self: C, batch: int) -> C:
        """A batch-1 conditioning repeated `batch` times (a view: the unconditional prompt)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 {type(self).__name__}, got batch {len(self)}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    @classmethod
    def cat(cls: type[C], conds: Sequence[C]) -> C:
        """Rows of `conds` one after another."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: torch.cat([getattr(c, n) for c in conds]) for n in names})

    @classmethod
    def where(cls: type[C], mask: torch.Tensor, a: C, b: C) -> C:
        """Row i from `a` where mask[i] (bool [B]), else from `b`."""
        def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), x.to(y.dtype), y)

        return cls(**{n: pick(getattr(a, n), getattr(b, n)) for n in (f.name for f in dataclasses.fields(cls))})

    def copy_(self: C, src: C, rows: slice = slice(None)) -> C:
        """Copy `src` into rows `rows` of these tensors in place (static buffers of a CUDA graph); returns self."""
        for name, t in self.tensors().items():
            t[rows].copy_(getattr(src, name))
        return self

    def zeros(self: C, batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> C:
        """A zero conditioning of this layout with `batch` rows (floating fields in `dtype`)."""
        return self._map(lambda t: torch.zeros((batch, *t.shape[1:]), device=device or t.device,
                                               dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype))

    def with_images(self: C, images: Mapping[str, torch.Tensor]) -> C:
        """These caption rows (from `EditTextEncoder.encode_edit`) joined with one source image each (`images`: the
        batch-first tensors of `ImageEncoder.encode`, row i for caption row i): the edit rows. Default: the family
        has no edit conditioning (TypeError)."""
        raise TypeError(f"{type(self).__name__} has no edit conditioning (no source images)")

    def forward_groups(self) -> list[list[int]]:
        """Row indices, in row order, of each group the family runs as its own forward (rows of different kinds);
        default: every row in one forward."""
        return [list(range(len(self)))]

    def uncond_twin(self: C, uncond: C) -> C:
        """Each row's unconditional twin for classifier-free guidance, given the empty prompt's conditioning
        `uncond` (batch 1). Default: the empty prompt for every row, nothing of the row kept (text-to-image).
        Edit conditioning overrides this to keep the row's source image (DanceOPD, DESIGN §1)."""
        return uncond.expand(len(self))


class TextEncoder(Protocol):
    """Prompts -> the family's conditioning; run once per prompt into the prompt cache, never in the hot loop."""

    @property
    def identity(self) -> str:
        """Changes whenever the outputs could (keys the prompt cache)."""
        ...

    def encode(self, prompts: list[str]) -> TensorCond:
        """Conditioning of `prompts` (float32, CPU); "" is the unconditional prompt."""
        ...


class EditTextEncoder(TextEncoder, Protocol):
    """A text encoder that can also write the caption rows of edit prompts (the family's edit layout)."""

    def encode_edit(self, prompts: list[str]) -> TensorCond:
        """Caption rows of edit prompts with one source image each (float32, CPU); join them with their images by
        `TensorCond.with_images`."""
        ...


class ImageEncoder(Protocol):
    """Source images -> the image tensors of edit rows; run once per image into the image cache, never in the loop."""

    @property
    def identity(self) -> str:
        """Changes whenever the outputs could (keys the image cache; includes the size images are resized to)."""
        ...

    def encode(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Batch-first tensors (float32, CPU) of RGB PIL images, as `TensorCond.with_images` takes them."""
        ...


class VAE(Protocol):
    """Pixels <-> latents in the family's convention (scaling and shift factors applied)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] as the transformer sees them."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer sees them -> [B, 3, H, W] in [-1, 1]."""
        ...

    def to(self, device: torch.device | str) -> VAE:
        """Move the VAE's weights to `device` (decoding follows them there); returns self."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """What generic code knows about a built or loaded model: its family, its diffusers config and the shapes."""

    family: str
    name: str
    """Preset name, or `loaded` for a model read from a dir."""
    config: Mapping[str, Any]
    """The transformer's diffusers config (constructor keyword arguments)."""
    latent_shape: tuple[int, ...]
    """Shape of one sample's latent as the velocity takes it, e.g. (C, H, W)."""
    text_tokens: int
    """Tokens of the prompt conditioning (FLOPs; 0 when unknown)."""


@runtime_checkable
class ModelBackend(Protocol):
    """One model family. Implementations import their heavy modules (diffusers, transformers) inside methods, so
    that looking up a backend to validate a config stays cheap."""

    family: str
    """`model.family` value that selects this backend."""
    default_lora_targets: tuple[str, ...]
    """`student.targets` when the config leaves it empty (peft module-name suffixes)."""
    cond_type: type[TensorCond]
    """The family's conditioning class (the prompt cache stores its fields)."""

    def preset_names(self) -> list[str]:
        """Named architectures `build` can make with random init."""
        ...

    def config_problems(self, config: Config) -> list[str]:
        """Family-specific impossible values of `config` (no file access): presets, latent size, attention."""
        ...

    def source_image_problem(self, config: Config, size: tuple[int, int]) -> str:
        """Why a source image of `size` (width, height) cannot condition an edit row of `config` ("" = it can); pure,
        so preflight can check every row's image before anything is loaded. A family without edit conditioning
        says so for every image."""
        ...

    def preflight(self, config: Config) -> list[str]:
        """Problems only the inputs can show (files read, nothing heavy loaded): the student's targets on the real
        architecture (built on the meta device), encoder width vs model width."""
        ...

    def preset_spec(self, preset: str, latent_size: int = 0) -> ModelSpec:
        """The spec of preset `preset` without building it (shapes, FLOPs, the builtin encoder's dims)."""
        ...

    def build(self, preset: str, seed: int, dtype: torch.dtype, latent_size: int = 0) -> tuple[torch.nn.Module,
                                                                                                ModelSpec]:
        """A randomly initialised transformer of preset `preset` (deterministic in `seed`) and its spec."""
        ...

    def load(self, path: Path, dtype: torch.dtype, latent_size: int = 0,
             text_tokens: int = 0) -> tuple[torch.nn.Module, ModelSpec]:
        """The transformer of a local diffusers dir (pipeline dir or transformer dir; no hub) and its spec.
        Errors name the offending file."""
        ...

    def sigmas(self, steps: int, shift: float) -> torch.Tensor:
        """The family pipeline's sampling schedule: `steps + 1` float32 noise levels from 1 (noise) down to 0, the
        grid every rollout and eval of the family steps over (SD3: FlowMatchEulerDiscreteScheduler's)."""
        ...

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 cond: TensorCond) -> torch.Tensor:
        """v(x, sigma | cond) with whatever adapter is active; sigma [B] (or scalar) in the engine's convention
        (1 = noise, 0 = data); the family maps it to its own timestep input."""
        ...

    def text_encoder(self, spec: str, model_spec: ModelSpec, max_sequence_length: int,
                     device: str | None = None) -> TextEncoder:
        """The encoder named by `data.encoder` (`builtin`, or a local pipeline dir; run on `device`, default the
        GPU when there is one)."""
        ...

    def image_encoder(self, spec: str, model_spec: ModelSpec, device: str | None = None) -> ImageEncoder:
        """The source-image encoder of `data.encoder = spec` (`builtin`, or a local pipeline dir) for edit rows;
        ValueError when the family has no edit conditioning."""
        ...

    def vae(self, path: Path | None) -> VAE | None:
        """The VAE of a local pipeline dir, or None when there is none (a preset, a transformer-only dir)."""
        ...

    def install_attention(self, model: torch.nn.Module, kind: str, backend: str) -> None:
        """`model.attention` (`reference` or a fused processor) with kernel `backend`; refuses what the family
        cannot do with a clear message."""
        ...

    def forward_flops(self, spec: ModelSpec, lora_rank: int | None, lora_targets: Sequence[str],
                      edit: bool = False) -> float:
        """Model FLOPs of one sample's forward (multiply-add = 2), with a LoRA of `lora_rank` on `lora_targets`; `edit`:
        an edit row (its source image's tokens too; ValueError for a family without edit rows)."""
        ...

    def save_lora(self, directory: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                  weight_name: str) -> None:
        """Write `state` (module-relative LoRA keys) in the family pipeline's own LoRA format, with `metadata`."""
        ...
