"""Z-Image conditioning as fixed-shape batch tensors (`ZImageCond`), for text-to-image and edit rows alike.

`ZImageTransformer2DModel.forward` takes per-sample Python lists (ragged captions, a list of images per sample in
its Omni mode); generic engine code needs tensors it can index, concatenate, copy into CUDA-graph buffers and cache.
`ZImageCond` stores the ragged parts padded to a fixed capacity with their lengths; `engine.backends.zimage.forward`
turns rows back into the lists diffusers takes.

Caption slots. Each row's caption tokens are packed back to back in `cap` [B, L, D], with `cap_lens` [B, 4] giving
the tokens of four slots:
- slot 0: the text-to-image caption (ZImagePipeline's chat template: one segment);
- slots 1-3: the three segments of ZImageOmniPipeline's edit template with one condition image
  (`_encode_prompt` with `num_condition_images = 1`): "user + <vision_start>" | "<vision_end> prompt ... assistant
  <vision_start>" | "<vision_end><im_end>". The model places the source image after segment 1 and the target after
  segment 2 (transformer_z_image.py `patchify_and_embed_omni`: `cap_end_pos`).
A text-to-image row uses slot 0, an edit row slots 1-3. The unconditional prompt "" is encoded in both layouts (all
four slots filled) so that its one row can be the classifier-free-guidance twin of either kind of row.

Edit rows (`n_source = 1`) also carry the clean VAE latent of the source image (`source`, the target latent's shape:
DanceOPD resizes the source to the training resolution, zimage_diffsynth.py:457) and optionally its SigLIP features
(`siglip` [B, N, D] row-major over the `siglip_hw` grid; (0, 0) = none, which is what DanceOPD's DiffSynth backend
passes: `siglip_feats=[None]`, zimage_diffsynth.py:282). Text-to-image rows hold zeros there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.backends.base import TensorCond

SLOTS = 4
T2I_SLOT = 0
OMNI_SLOTS = (1, 2, 3)


@dataclass(frozen=True)
class ZImageCond(TensorCond):
    """Conditioning of a batch of Z-Image rows (see the module docstring for the layout)."""

    cap: torch.Tensor
    """[B, L, cap_feat_dim] caption features of the row's slots, packed from position 0 (the rest is zero)."""
    cap_lens: torch.Tensor
    """[B, 4] int64 tokens per slot (slot 0 T2I caption; 1-3 the Omni edit segments)."""
    source: torch.Tensor
    """[B, C, H, W] clean VAE latent of the source image (scaled and shifted); zeros for T2I rows."""
    siglip: torch.Tensor
    """[B, N, siglip_dim] SigLIP features of the source, the first h*w rows of the (h, w) grid; zeros if none."""
    siglip_hw: torch.Tensor
    """[B, 2] int64 SigLIP grid (h, w); (0, 0) when the row has no SigLIP features."""
    n_source: torch.Tensor
    """[B] int64 condition images: 0 = text-to-image (diffusers' basic mode), 1 = edit (Omni mode)."""

    def __post_init__(self) -> None:
        b = self.cap.shape[0]
        if self.cap_lens.shape != (b, SLOTS):
            raise ValueError(f"cap_lens must be [{b}, {SLOTS}], got {tuple(self.cap_lens.shape)}")
        if any(t.shape[0] != b for t in (self.source, self.siglip, self.siglip_hw, self.n_source)):
            raise ValueError("every ZImageCond field needs the same batch size")

    def is_edit(self) -> torch.Tensor:
        """[B] bool: rows in Omni mode (a clean source before the noisy target)."""
        return self.n_source > 0

    def segments(self, i: int) -> list[torch.Tensor]:
        """Caption features of row `i` as the model takes them: [slot 0] for T2I, [slots 1, 2, 3] for an edit."""
        lens = [int(n) for n in self.cap_lens[i].tolist()]
        starts = [sum(lens[:k]) for k in range(SLOTS)]
        slots = OMNI_SLOTS if int(self.n_source[i]) > 0 else (T2I_SLOT,)
        return [self.cap[i, starts[k] : starts[k] + lens[k]] for k in slots]

    def with_source(self, source: torch.Tensor, siglip: torch.Tensor | None = None,
                    siglip_hw: torch.Tensor | None = None) -> ZImageCond:
        """These caption rows (edit layout) with their source images: the conditioning of edit rows."""
        if bool((self.cap_lens[:, 1:].sum(1) == 0).any()):
            raise ValueError("with_source needs captions in the Omni edit layout (encode_edit), got T2I captions")
        if source.shape != self.source.shape:
            raise ValueError(f"source latents {tuple(source.shape)} do not match this layout "
                             f"{tuple(self.source.shape)}")
        b = len(self)
        if siglip is None:
            siglip, siglip_hw = torch.zeros_like(self.siglip), torch.zeros_like(self.siglip_hw)
        elif siglip_hw is None or siglip.shape != self.siglip.shape:
            raise ValueError(f"siglip {tuple(siglip.shape)} needs siglip_hw and this layout {tuple(self.siglip.shape)}")
        return ZImageCond(cap=self.cap, cap_lens=self.cap_lens, source=source.to(self.source.dtype),
                          siglip=siglip.to(self.siglip.dtype), siglip_hw=siglip_hw.to(torch.int64),
                          n_source=torch.ones(b, dtype=torch.int64, device=self.n_source.device))

    def with_images(self, images: Mapping[str, torch.Tensor]) -> ZImageCond:
        """Edit rows from these caption rows and an image encoder's tensors (`source`, optional `siglip` +
        `siglip_hw`): `with_source` under the engine's generic name."""
        if "source" not in images:
            raise KeyError(f"Z-Image edit rows need a 'source' latent per row; got {sorted(images)}")
        return self.with_source(images["source"], images.get("siglip"), images.get("siglip_hw"))

    def kinds(self) -> dict[tuple[int, bool], list[int]]:
        """Row indices per forward kind, (n_source, has SigLIP) -> rows in row order: diffusers' basic mode for T2I
        rows and its Omni mode for edit rows are different calls (engine/backends/zimage/forward.py)."""
        groups: dict[tuple[int, bool], list[int]] = {}
        hw = self.siglip_hw.prod(1).tolist()
        for i, n in enumerate(self.n_source.tolist()):
            groups.setdefault((int(n), int(n) > 0 and hw[i] > 0), []).append(i)
        return groups

    def forward_groups(self) -> list[list[int]]:
        """The rows of each forward kind (`kinds`), in first-seen order."""
        return list(self.kinds().values())

    def uncond_twin(self, uncond: ZImageCond) -> ZImageCond:
        """Each row's unconditional twin: the empty prompt in the row's own layout; an edit row keeps its source
        latent and SigLIP features (ZImageOmniPipeline `negative_condition_latents` / `..._siglip_embeds` are clones
        of the conditional ones; DanceOPD `_cfg_velocity` passes the same `image_latents` to both branches,
        zimage_diffsynth.py:304-309). Only the prompt is dropped."""
        if len(uncond) != 1:
            raise ValueError(f"uncond must be the batch-1 empty-prompt conditioning, got batch {len(uncond)}")
        lens = uncond.cap_lens[0]
        edit = self.is_edit()
        if bool(edit.any()) and int(lens[1:].sum()) == 0:
            raise ValueError("the unconditional conditioning has no Omni (edit) layout: encode it with encode([''])")
        if bool((~edit).any()) and int(lens[0]) == 0:
            raise ValueError("the unconditional conditioning has no T2I layout: encode it with encode([''])")
        b, n0 = len(self), int(lens[0])
        cap_t2i = torch.zeros_like(uncond.cap)
        cap_t2i[:, :n0] = uncond.cap[:, :n0]
        cap_omni = torch.zeros_like(uncond.cap)
        n_omni = int(lens[1:].sum())
        cap_omni[:, :n_omni] = uncond.cap[:, n0 : n0 + n_omni]
        zero = torch.zeros_like(lens[:1])
        lens_t2i = torch.cat([lens[:1], zero, zero, zero])
        lens_omni = torch.cat([zero, lens[1:]])
        pick = edit.to(uncond.cap.device)
        cap = torch.where(pick.view(-1, 1, 1), cap_omni.expand(b, -1, -1), cap_t2i.expand(b, -1, -1))
        cap_lens = torch.where(pick.view(-1, 1), lens_omni.view(1, -1), lens_t2i.view(1, -1))
        return ZImageCond(cap=cap.to(self.cap.dtype), cap_lens=cap_lens, source=self.source, siglip=self.siglip,
                          siglip_hw=self.siglip_hw, n_source=self.n_source)


def pack_captions(rows: list[list[torch.Tensor] | None], t2i: list[torch.Tensor | None], capacity: int, dim: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(cap [B, capacity, dim], cap_lens [B, 4]) from per-row T2I captions (`t2i[i]`, [n, dim] or None) and Omni
    segments (`rows[i]`, three [n_k, dim] tensors or None). ValueError naming the row when it does not fit."""
    b = len(rows)
    cap = torch.zeros(b, capacity, dim, dtype=dtype)
    cap_lens = torch.zeros(b, SLOTS, dtype=torch.int64)
    for i in range(b):
        parts: list[torch.Tensor] = [t2i[i] if t2i[i] is not None else torch.zeros(0, dim)]
        omni = rows[i]
        if omni is not None:
            if len(omni) != len(OMNI_SLOTS):
                raise ValueError(f"row {i}: the Omni edit layout has {len(OMNI_SLOTS)} segments, got {len(omni)}")
            parts += list(omni)
        else:
            parts += [torch.zeros(0, dim)] * len(OMNI_SLOTS)
        total = sum(p.shape[0] for p in parts)
        if total > capacity:
            raise ValueError(f"row {i}: {total} caption tokens exceed the conditioning capacity {capacity}")
        cap[i, :total] = torch.cat(parts).to(dtype)
        cap_lens[i] = torch.tensor([p.shape[0] for p in parts])
    return cap, cap_lens


def empty_images(batch: int, latent_shape: tuple[int, ...], siglip_tokens: int, siglip_dim: int,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The image fields of rows without a source image (zeros, `n_source` 0)."""
    return dict(source=torch.zeros(batch, *latent_shape, dtype=dtype),
                siglip=torch.zeros(batch, siglip_tokens, siglip_dim, dtype=dtype),
                siglip_hw=torch.zeros(batch, 2, dtype=torch.int64),
                n_source=torch.zeros(batch, dtype=torch.int64))
