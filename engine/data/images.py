"""Source images encoded once (the image cache) and each prompt row's conditioning, edit rows included.

Image cache: one safetensors file per distinct source image under `<data.image_cache>/<key>/<sha256>.safetensors`,
`key` = 16 hex digits of the image encoder's identity (which includes the size sources are resized to), `sha256` =
of the file's bytes, so a renamed or copied image is encoded once and a changed one never served stale. Each file
holds the encoder's tensors for that image (Z-Image: the clean VAE latent `source`, with a SigLIP branch also
`siglip`, `siglip_hw`) and, as metadata, the identity and the file it was built from. Rank 0 builds what is missing
(atomic writes: a killed build leaves no half file); other ranks wait at a barrier and read. An unreadable entry is
reported by name and rebuilt. Reading is lazy (an LRU of decoded entries), so a large edit set needs no RAM for
images it is not training on right now.

Row conditioning (`RowConditioning.rows(prompt_ids)`): a text-to-image row is the prompt cache's row of its text
(engine/data/cache.py, unchanged); an edit row is its caption in the family's edit layout (`encode_edit`, cached
the same way in a second prompt cache) joined with its source image's tensors by `TensorCond.with_images`. The
unconditional prompt comes from the T2I cache: the family encodes "" in every layout (Z-Image: both), so its one row
is the CFG twin of either kind, and `uncond_twin` keeps an edit row's image (DanceOPD, zimage_diffsynth.py:304-309).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.backends.base import ImageEncoder, ModelBackend, ModelSpec, TensorCond, TextEncoder
from engine.data.cache import PromptEmbeddings, load_or_build
from engine.data.prompts import Prompt

if TYPE_CHECKING:
    from engine.config.schema import Config

log = logging.getLogger(__name__)
BUILD_BATCH = 8  # images per encoder call while building (a 1024 px VAE encode is ~1 GB of activations each)
LRU_ENTRIES = 512  # decoded entries kept (Z-Image at 1024 px: 1 MB latent + 1.2 MB SigLIP each, ~1.1 GB)


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes: the image's cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EditCaptions:
    """An `EditTextEncoder` seen as a `TextEncoder` whose `encode` is `encode_edit`, so the prompt cache
    (engine/data/cache.py) stores edit-layout captions as it stores any prompt's conditioning."""

    def __init__(self, encoder: TextEncoder):
        if not hasattr(encoder, "encode_edit"):
            raise ValueError(f"the text encoder {encoder.identity!r} cannot encode edit prompts (no encode_edit): "
                             f"edit rows (a source_image) need an encoder of the family's edit conditioning")
        self.encoder = encoder

    @property
    def identity(self) -> str:
        """The text encoder's identity in the edit layout."""
        return f"{self.encoder.identity}:edit1"

    def encode(self, prompts: list[str]) -> TensorCond:
        """Caption rows of edit prompts (one source image each)."""
        return self.encoder.encode_edit(prompts)  # type: ignore[attr-defined]


class ImageCache:
    """Encoded source images by file digest (see the module docstring for the layout)."""

    def __init__(self, encoder_identity: str, directory: Path):
        self.identity = encoder_identity
        self.directory = Path(directory) / hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self._lru: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def entry(self, digest: str) -> Path:
        """The file of the image with sha256 `digest`."""
        return self.directory / f"{digest}.safetensors"

    def _readable(self, digest: str) -> bool:
        path = self.entry(digest)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("identity") == self.identity
        except Exception as exc:  # a torn or foreign file: say which, then rebuild
            log.warning("image cache entry %s is unreadable (%s): rebuilding", path, exc)
            return False

    def build(self, encoder: ImageEncoder, files: dict[str, str]) -> int:
        """Encode every image of `files` (digest -> a file with those bytes) that has no entry yet; returns how
        many were encoded."""
        from PIL import Image

        todo = [d for d in sorted(files) if not self._readable(d)]
        self.directory.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(todo), BUILD_BATCH):
            chunk = todo[i : i + BUILD_BATCH]
            images = []
            for d in chunk:
                with Image.open(files[d]) as im:
                    images.append(im.convert("RGB"))
            tensors = encoder.encode(images)
            for j, d in enumerate(chunk):
                path = self.entry(d)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                save_file({k: v[j].contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"identity": self.identity, "file": str(files[d])})
                os.replace(tmp, path)
        return len(todo)

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        """The tensors of one image (KeyError naming the entry when it was never built)."""
        if digest in self._lru:
            self._lru.move_to_end(digest)
            return self._lru[digest]
        path = self.entry(digest)
        if not path.is_file():
            raise KeyError(f"image cache entry {path} missing (was the cache built for these prompts?)")
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
        self._lru[digest] = out
        if len(self._lru) > LRU_ENTRIES:
            self._lru.popitem(last=False)
        return out

    def stack(self, digests: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch-first tensors of images `digests`, in order (what `TensorCond.with_images` takes)."""
        entries = [self.get(d) for d in digests]
        return {k: torch.stack([e[k] for e in entries]) for k in entries[0]}


class RowConditioning:
    """Each prompt row's conditioning (see the module docstring); `uncond` is the empty prompt's (batch 1)."""

    def __init__(self, prompts: Sequence[Prompt], t2i: PromptEmbeddings, edit: PromptEmbeddings | None = None,
                 images: ImageCache | None = None, digests: Sequence[str] = ()):
        self.prompts = list(prompts)
        self.t2i, self.edit, self.images = t2i, edit, images
        self.digests = list(digests) if digests else [""] * len(self.prompts)
        """Per prompt row: the sha256 of its source image ("" for a text-to-image row)."""
        if (edit is None or images is None) and any(self.digests):
            raise ValueError("edit rows need the edit-caption cache and the image cache")

    @property
    def uncond(self) -> TensorCond:
        """The empty prompt's conditioning (batch 1), the CFG twin of every kind of row."""
        return self.t2i.uncond

    def rows(self, prompt_ids: Sequence[int]) -> TensorCond:
        """The conditioning of prompt rows `prompt_ids`, in that order (CPU)."""
        texts = [self.prompts[i].text for i in prompt_ids]
        edits = [k for k, i in enumerate(prompt_ids) if self.digests[i]]
        if not edits:
            return self.t2i.cond(texts)
        assert self.edit is not None and self.images is not None
        rows = self.edit.cond([texts[k] for k in edits]).with_images(
            self.images.stack([self.digests[prompt_ids[k]] for k in edits]))
        if len(edits) == len(prompt_ids):
            return rows
        plain = [k for k in range(len(prompt_ids)) if not self.digests[prompt_ids[k]]]
        both = type(rows).cat([self.t2i.cond([texts[k] for k in plain]), rows])
        where = {k: n for n, k in enumerate(plain + edits)}
        return both[torch.tensor([where[k] for k in range(len(prompt_ids))])]


def build_image_encoder(spec: str, backend: ModelBackend, model: ModelSpec, device: str | None = None) -> ImageEncoder:
    """The source-image encoder of `data.encoder = spec`: a miniature world's (by its name) or the family's."""
    from engine.worlds import find_world

    world = find_world(spec) if spec != "builtin" else None
    if world is not None:
        return world.image_encoder()
    return backend.image_encoder(spec, model, device)


def row_conditioning(config: Config, backend: ModelBackend, model: ModelSpec, prompts: Sequence[Prompt],
                     encoder: TextEncoder, t2i: PromptEmbeddings, out_dir: Path, rank: int,
                     broadcast: Callable[[Any], Any], dtype: torch.dtype = torch.float32) -> RowConditioning:
    """The run's `RowConditioning`: for a prompt set with edit rows, the edit captions (in `dtype`, as the prompt
    cache) and the source images are encoded once into their caches. Rank 0 builds them; `broadcast` (rank 0's value
    on every rank, a collective) then hands the image encoder's identity to the other ranks, which read without
    building an encoder. Edit rows take the captions' dtype (`with_images` casts the image tensors)."""
    if not any(p.source for p in prompts):
        return RowConditioning(prompts, t2i)
    d = config.data
    edit_texts = sorted({p.text for p in prompts if p.source})
    caption_cache = (Path(d.cache).with_suffix(".edit.safetensors") if d.cache
                     else out_dir / "edit_prompt_cache.safetensors")
    image_dir = Path(d.image_cache) if d.image_cache else out_dir / "image_cache"
    captions = EditCaptions(encoder)
    digests = {f: file_digest(f) for f in sorted({p.source for p in prompts if p.source})}
    identity = ""
    if rank == 0:
        edit = load_or_build(captions, edit_texts, caption_cache, backend.cond_type, dtype)
        image_encoder = build_image_encoder(d.encoder, backend, model)
        identity = image_encoder.identity
        cache = ImageCache(identity, image_dir)
        built = cache.build(image_encoder, {dg: f for f, dg in digests.items()})
        log.info("image cache %s: %d source images, %d encoded now", cache.directory, len(set(digests.values())),
                 built)
        del image_encoder  # its VAE / SigLIP are not needed once the cache is built
    identity = broadcast(identity)
    if rank != 0:
        edit = load_or_build(captions, edit_texts, caption_cache, backend.cond_type, dtype)
    return RowConditioning(prompts, t2i, edit, ImageCache(identity, image_dir),
                           [digests.get(p.source, "") for p in prompts])
