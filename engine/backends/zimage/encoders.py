"""Prompts and source images -> `ZImageCond`, through the components of a local Z-Image pipeline dir (or builtins).

- `QwenPromptEncoder`: the pipeline's own tokenizer + text encoder (Qwen3 for the released models). T2I captions
  follow ZImagePipeline `_encode_prompt` (chat template with `enable_thinking=True`, padding to
  `max_sequence_length`, `hidden_states[-2]` at the unmasked tokens); edit captions follow ZImageOmniPipeline
  `_encode_prompt` with one condition image (three segments, each tokenised and embedded on its own).
- `HashPromptEncoder` (`builtin`): word -> a fixed row of a seeded N(0, 1) table, for tests and the miniature world.
  It has no chat template: the Omni layout's fixed segments are empty (0 tokens) and the prompt segment is
  "<bos> words"; that saves 64 padded caption tokens per edit row (SEQ_MULTI_OF = 32 per segment), measured
  0.38 s instead of 0.62 s for a batch-32 edit step of `zimage-tiny` on 1 CPU thread.
- `ZImageVAE`: AutoencoderKL with Z-Image's shift and scaling (latents = (mode(E(x)) - shift) * scale).
- `SourceEncoder`: source images -> (clean VAE latents, SigLIP features, grid), as ZImageOmniPipeline's
  `prepare_image_latents` and `prepare_siglip_embeds` do; `edit_cond(...)` puts captions and sources together.
- `SourceImages` (a pipeline dir) and `PixelImageEncoder` (`builtin`: latents are pixels, the editing world): the
  engine's `ImageEncoder` protocol, what the image cache (engine/data/edits.py) runs once per source image.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.backends.zimage.cond import ZImageCond, empty_images, pack_captions

CAPTION_MARGIN = 64
"""Capacity beyond `max_sequence_length` for the Omni template's fixed segments (5 + 2 Qwen tokens) and the
unconditional prompt's second layout."""


def omni_texts(prompt: str, num_condition_images: int = 1) -> list[str]:
    """ZImageOmniPipeline `_encode_prompt`'s segments for `prompt` with `num_condition_images` source images."""
    parts = ["<|im_start|>user\n<|vision_start|>"]
    parts += ["<|vision_end|><|vision_start|>"] * (num_condition_images - 1)
    parts += ["<|vision_end|>" + prompt + "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"]
    parts += ["<|vision_end|><|im_end|>"]
    return parts


def load_component(path: Path, name: str) -> Any:
    """Component `name` of the pipeline dir `path`, by the class its `model_index.json` names (no hub)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: not found (expected a diffusers Z-Image pipeline dir)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_file}: not valid JSON ({e})") from e
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise FileNotFoundError(f"{index_file}: the pipeline has no {name!r} component")
    library, cls_name = entry
    if not (path / name).is_dir():
        raise FileNotFoundError(f"{path / name}: component dir missing (named in {index_file})")
    import importlib

    module = importlib.import_module(library)
    cls = getattr(module, cls_name, None)
    if cls is None and cls_name == "Siglip2ImageProcessor":  # transformers without torchvision
        cls = getattr(module, "Siglip2ImageProcessorPil", None)
    if cls is None:
        raise ValueError(f"{index_file}: {library}.{cls_name} (component {name!r}) is not importable")
    try:
        return cls.from_pretrained(str(path / name), local_files_only=True)
    except TypeError:
        return cls.from_pretrained(str(path / name))


class PromptEncoderBase:
    """Packs per-prompt caption features into `ZImageCond` rows; subclasses embed the text."""

    def __init__(self, dim: int, capacity: int, latent_shape: Sequence[int], siglip_tokens: int = 0,
                 siglip_dim: int = 0):
        self.dim, self.capacity = dim, capacity
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.siglip_tokens, self.siglip_dim = siglip_tokens, siglip_dim

    def t2i_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [n, dim] caption (the T2I layout's single segment) per prompt."""
        raise NotImplementedError

    def omni_features(self, prompts: list[str]) -> list[list[torch.Tensor]]:
        """The three Omni edit-layout segments ([n_k, dim] each) per prompt."""
        raise NotImplementedError

    def _cond(self, t2i: list, omni: list, n_source: int) -> ZImageCond:
        cap, cap_lens = pack_captions(omni, t2i, self.capacity, self.dim)
        images = empty_images(len(t2i), self.latent_shape, self.siglip_tokens, self.siglip_dim)
        images["n_source"].fill_(n_source)
        return ZImageCond(cap=cap, cap_lens=cap_lens, **images)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> ZImageCond:
        """Text-to-image rows (float32, CPU). The unconditional prompt "" gets both layouts (see cond.py), so its
        row can be the CFG twin of T2I and edit rows alike."""
        t2i = self.t2i_features(list(prompts))
        empty = [i for i, p in enumerate(prompts) if p == ""]
        omni: list[list[torch.Tensor] | None] = [None] * len(prompts)
        if empty:
            for i, segs in zip(empty, self.omni_features([""] * len(empty))):
                omni[i] = segs
        return self._cond(t2i, omni, 0)

    @torch.no_grad()
    def encode_edit(self, prompts: list[str]) -> ZImageCond:
        """Caption rows of edit prompts (Omni layout, one source image); attach the images with
        `ZImageCond.with_source` (or `edit_cond`)."""
        return self._cond([None] * len(prompts), self.omni_features(list(prompts)), 1)


class HashPromptEncoder(PromptEncoderBase):
    """Deterministic stand-in encoder: "<bos>" + lower-cased words, word -> row crc32(word) % vocab of a seeded
    N(0, 1) table (no positions: the context refiner's RoPE sees the order)."""

    def __init__(self, dim: int, latent_shape: Sequence[int], max_sequence_length: int = 32, vocab: int = 4096,
                 seed: int = 1234, siglip_tokens: int = 0, siglip_dim: int = 0):
        super().__init__(dim, max_sequence_length, latent_shape, siglip_tokens, siglip_dim)
        self.max_sequence_length, self.vocab, self.seed = max_sequence_length, vocab, seed
        self.table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))

    @property
    def identity(self) -> str:
        """Changes whenever the features could (keys the prompt cache)."""
        return f"zimage-hash:{self.dim}:{self.max_sequence_length}:{self.vocab}:{self.seed}"

    def tokens(self, prompt: str) -> list[str]:
        """The words of `prompt`, lower-cased, after "<bos>"; ValueError when longer than max_sequence_length."""
        words = ["<bos>", *prompt.lower().split()]
        if len(words) > self.max_sequence_length:
            raise ValueError(f"prompt has {len(words)} tokens > max_sequence_length {self.max_sequence_length}: "
                             f"{prompt!r}")
        return words

    def _features(self, prompt: str) -> torch.Tensor:
        ids = torch.tensor([zlib.crc32(w.encode()) % self.vocab for w in self.tokens(prompt)])
        return self.table[ids]

    def t2i_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """The hashed words of each prompt (one segment)."""
        return [self._features(p) for p in prompts]

    def omni_features(self, prompts: list[str]) -> list[list[torch.Tensor]]:
        """Empty template segments around the hashed prompt (no chat template: see the module docstring)."""
        empty = torch.zeros(0, self.dim)
        return [[empty, self._features(p), empty] for p in prompts]


class QwenPromptEncoder(PromptEncoderBase):
    """The pipeline's tokenizer + text encoder, exactly as ZImagePipeline / ZImageOmniPipeline encode prompts."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_sequence_length: int,
                 latent_shape: Sequence[int], siglip_tokens: int = 0, siglip_dim: int = 0, identity: str = ""):
        dim = int(text_encoder.config.hidden_size)
        super().__init__(dim, max_sequence_length + CAPTION_MARGIN, latent_shape, siglip_tokens, siglip_dim)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval()
        self.max_sequence_length = max_sequence_length
        self._identity = identity or f"zimage-qwen:{id(text_encoder)}:{max_sequence_length}"

    @classmethod
    def from_dir(cls, path: Path, max_sequence_length: int, latent_shape: Sequence[int], siglip_tokens: int = 0,
                 siglip_dim: int = 0, dtype: torch.dtype = torch.float32) -> QwenPromptEncoder:
        """The tokenizer and text encoder (in `dtype`) of the local pipeline dir `path` (no hub)."""
        path = Path(path)
        tokenizer = load_component(path, "tokenizer")
        text_encoder = load_component(path, "text_encoder").to(dtype)
        return cls(tokenizer, text_encoder, max_sequence_length, latent_shape, siglip_tokens, siglip_dim,
                   identity=f"zimage-qwen:{path.resolve()}:{max_sequence_length}")

    @property
    def identity(self) -> str:
        """The pipeline dir and sequence length (keys the prompt cache)."""
        # dtype is left out on purpose (as for SD3): a cache built in bf16 on a GPU node serves fp32 runs too
        return self._identity

    @torch.no_grad()
    def embed(self, texts: list[str]) -> list[torch.Tensor]:
        """Hidden states [-2] of each text at its real tokens (pipeline_z_image_omni.py `_encode_prompt`)."""
        device = next(self.text_encoder.parameters()).device
        inputs = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt")
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[j][mask[j]].float().cpu() for j in range(len(texts))]

    def t2i_text(self, prompt: str) -> str:
        """ZImagePipeline `_encode_prompt`'s chat-templated text."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    def t2i_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """ZImagePipeline's caption features of each prompt."""
        return self.embed([self.t2i_text(p) for p in prompts])

    def omni_features(self, prompts: list[str]) -> list[list[torch.Tensor]]:
        """ZImageOmniPipeline's three caption segments of each prompt with one condition image."""
        flat = [s for p in prompts for s in omni_texts(p)]  # one tokenizer batch, as the pipeline does
        feats = self.embed(flat)
        k = len(omni_texts(""))
        return [feats[i * k : (i + 1) * k] for i in range(len(prompts))]


class ZImageVAE:
    """Pixels [-1, 1] <-> Z-Image latents: (mode(E(x)) - shift_factor) * scaling_factor and back."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval()
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor if vae.config.shift_factor is not None else 0.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (2^(blocks - 1): 8 for the FLUX VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8] as the transformer sees them (float32)."""
        p = next(self.vae.parameters())
        # ZImageOmniPipeline.prepare_image_latents casts to bfloat16 (`image.bfloat16()`, so it needs a bf16 VAE);
        # here the input follows the VAE's own dtype, which is the same thing for the released bf16 pipelines.
        lat = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mode()
        return ((lat - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer sees them -> [B, 3, H, W] in [-1, 1] (float32)."""
        p = next(self.vae.parameters())
        return self.vae.decode((latents.to(p.device, p.dtype) / self.scaling) + self.shift,
                               return_dict=False)[0].float()


class SourceEncoder:
    """Source images -> clean VAE latents and SigLIP features, as ZImageOmniPipeline prepares condition images."""

    def __init__(self, vae: ZImageVAE, siglip: torch.nn.Module | None = None, siglip_processor: Any = None,
                 siglip_tokens: int = 0):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.vae, self.siglip, self.processor = vae, siglip, siglip_processor
        self.siglip_tokens = siglip_tokens
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=vae.scale_factor * 2)

    @classmethod
    def from_dir(cls, path: Path, siglip: bool = True, dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype = torch.bfloat16) -> SourceEncoder:
        """The VAE (and, with `siglip`, the SigLIP model + processor in `dtype`) of a local Z-Image pipeline dir.
        The VAE runs in bfloat16 by default because ZImageOmniPipeline encodes condition images in bfloat16
        (`self.vae.encode(image.bfloat16())`), so the cached source latents are the pipeline's."""
        path = Path(path)
        vae = ZImageVAE(load_component(path, "vae").to(vae_dtype))
        if not siglip:
            return cls(vae)
        model = load_component(path, "siglip").to(dtype).eval()
        processor = load_component(path, "siglip_processor")
        return cls(vae, model, processor, int(getattr(processor, "max_num_patches", 256)))

    @property
    def siglip_dim(self) -> int:
        """Width of the SigLIP features (0 without a SigLIP model)."""
        return int(self.siglip.config.hidden_size) if self.siglip is not None else 0

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> tuple[Any, torch.Tensor]:
        """(the image SigLIP sees, the VAE input [1, 3, H, W] in [-1, 1]) of one PIL image. `size` (width, height):
        resize first, as DanceOPD does to the training resolution (zimage_diffsynth.py:457); then the pipeline's
        own steps: shrink to 1024^2 pixels when larger, centre-crop to a multiple of 2 x the VAE factor."""
        if size is not None:
            image = image.resize(size)
        w, h = image.size
        if w * h > 1024 * 1024:
            image = self.image_processor._resize_to_target_area(image, 1024 * 1024)
            w, h = image.size
        m = self.vae.scale_factor * 2
        pixels = self.image_processor.preprocess(image, height=(h // m) * m, width=(w // m) * m, resize_mode="crop")
        return image, pixels

    @torch.no_grad()
    def siglip_features(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """([h * w, D] SigLIP last hidden states, (h, w)) of one image (ZImageOmniPipeline.prepare_siglip_embeds)."""
        p = next(self.siglip.parameters())
        inputs = self.processor(images=[image], return_tensors="pt").to(p.device)
        h, w = (int(v) for v in inputs.spatial_shapes[0].tolist())
        hidden = self.siglip(**inputs).last_hidden_state[0, : h * w]
        return hidden.float().cpu(), (h, w)

    @torch.no_grad()
    def encode(self, images: Sequence[Any], size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(latents [B, C, h, w], SigLIP [B, N, D] or None, grids [B, 2] or None) of PIL images of one size."""
        prepared = [self.prepare(im, size) for im in images]
        latents = torch.cat([self.vae.encode(px) for _, px in prepared])
        if self.siglip is None:
            return latents, None, None
        feats = torch.zeros(len(images), self.siglip_tokens, self.siglip_dim)
        grids = torch.zeros(len(images), 2, dtype=torch.int64)
        for i, (im, _) in enumerate(prepared):
            f, hw = self.siglip_features(im)
            if f.shape[0] > self.siglip_tokens:
                raise ValueError(f"image {i}: {f.shape[0]} SigLIP tokens > capacity {self.siglip_tokens}")
            feats[i, : f.shape[0]] = f
            grids[i] = torch.tensor(hw)
        return latents, feats, grids


def edit_cond(captions: ZImageCond, latents: torch.Tensor, siglip: torch.Tensor | None = None,
              siglip_hw: torch.Tensor | None = None) -> ZImageCond:
    """Edit rows: `encode_edit` captions with their source latents (and SigLIP features, if any)."""
    return captions.with_source(latents, siglip, siglip_hw)


class SourceImages:
    """`SourceEncoder` as the engine's `ImageEncoder`: every source resized to the training size first, as DanceOPD
    does (`image.resize((width, height))`, zimage_diffsynth.py:457), then the pipeline's own preparation."""

    def __init__(self, encoder: SourceEncoder, size: tuple[int, int], identity: str):
        self.encoder, self.size, self._identity = encoder, size, identity

    @property
    def identity(self) -> str:
        """The pipeline dir, the size and the SigLIP capacity (keys the image cache)."""
        return self._identity

    def encode(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """{"source": [B, C, h, w]} (+ "siglip" [B, N, D], "siglip_hw" [B, 2] with a SigLIP branch), float32."""
        latents, feats, grids = self.encoder.encode(images, self.size)
        out = {"source": latents.float().cpu()}
        if feats is not None and grids is not None:
            out.update(siglip=feats, siglip_hw=grids)
        return out


class PixelImageEncoder:
    """`builtin` source images for a model whose latents are the pixels (in_channels 3, no VAE: the editing world):
    RGB resized to the latent size (PIL's default filter, as DanceOPD resizes) and scaled to [-1, 1]."""

    def __init__(self, latent_shape: Sequence[int]):
        c, self.height, self.width = (int(v) for v in latent_shape)
        if c != 3:
            raise ValueError(f"the builtin (pixel) source-image encoder needs 3 latent channels, the model has {c}: "
                             f"set data.encoder to a Z-Image pipeline dir (its vae/ encodes the sources)")

    @property
    def identity(self) -> str:
        """The size the images are resized to (keys the image cache)."""
        return f"zimage-pixels:{self.height}x{self.width}"

    def encode(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """{"source": [B, 3, H, W]} in [-1, 1]: 8-bit RGB values v as v / 127.5 - 1."""
        import numpy as np

        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (self.width, self.height):
                im = im.resize((self.width, self.height))
            arrays.append(np.asarray(im, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return {"source": (x / 127.5 - 1.0).contiguous()}
