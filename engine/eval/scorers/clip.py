"""CLIP-based scorers from local transformers dirs: PickScore, CLIP score and a LAION-style aesthetic head.

Conventions (flow_grpo's scorers, as copied into Flow-OPD's `flow_grpo/`):
- `pickscore`: `logit_scale.exp() * cos(text, image)` of the PickScore_v1 CLIP (pickscore_scorer.py:38-47), NOT
  divided by 26 (line 49): the Flow-OPD card reports the raw value (base 21.64) and divides by 26 only in its
  average (engine/eval/table.py). The processor is CLIP-ViT-H-14's (line 8): put its files into the dir, or into
  a `processor/` subdir.
- `clip`: `logits_per_image.diagonal() / 30` of CLIP ViT-L/14 (clip_scorer.py:53), text padded to 77 tokens
  (line 48).
- `aesthetic`: the improved-aesthetic-predictor MLP on the L2-normalised CLIP ViT-L/14 image embedding
  (aesthetic_scorer.py:50-53); its weights `aesthetic_mlp.safetensors` (the `.pth` converted once outside the
  engine: the engine loads no pickle) hold `layers.<i>.weight/bias` of its Linear layers, applied in order with
  no activation between them, as that MLP does (dropout only, lines 16-25).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.eval.scorers import register_scorer
from engine.eval.scorers.base import (
    BaseScorer,
    Metadata,
    ScorerError,
    batches,
    check_dir,
    check_processor,
    embedding,
    load_pretrained,
    to_pil,
)

AESTHETIC_WEIGHTS = "aesthetic_mlp.safetensors"


class ClipBase(BaseScorer):
    """A CLIPModel + CLIPProcessor from one local dir (the processor from `processor/` when that exists)."""

    batch = 16

    def __init__(self, name: str, path: str | Path, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.name = name
        root = check_dir(name, path, ("config.json",))
        proc_dir = check_processor(name, root / "processor" if (root / "processor").is_dir() else root)
        self.device = device
        self.processor = load_pretrained(name, proc_dir, CLIPProcessor.from_pretrained)
        self.model = load_pretrained(name, root, lambda p: CLIPModel.from_pretrained(p, local_files_only=True))
        self.model = self.model.eval().requires_grad_(False).to(device)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings [B, D] (float32)."""
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        emb = embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str], padding: bool | str = True) -> torch.Tensor:
        """L2-normalised projected text embeddings [B, D] (float32), truncated at 77 tokens."""
        tok = self.processor(text=list(prompts), padding=padding, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        emb = embedding(self.model.get_text_features(**tok))
        return torch.nn.functional.normalize(emb.float(), dim=-1)


class PickScore(ClipBase):
    """PickScore: logit_scale.exp() * cos(text, image) per image (raw; the card's average divides by 26)."""

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] PickScores."""
        out = []
        scale = self.model.logit_scale.exp().float()
        for s in batches(len(prompts), self.batch):
            cos = (self.text_embeds(prompts[s]) * self.image_embeds(images[s])).sum(-1)
            out.append((scale * cos).cpu())
        return torch.cat(out).double().numpy()


class ClipScore(ClipBase):
    """flow_grpo's CLIP score: logits_per_image.diagonal() / 30 (text padded to 77 tokens)."""

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] CLIP scores."""
        out = []
        scale = self.model.logit_scale.exp().float()
        for s in batches(len(prompts), self.batch):
            cos = (self.text_embeds(prompts[s], padding="max_length") * self.image_embeds(images[s])).sum(-1)
            out.append((scale * cos / 30.0).cpu())
        return torch.cat(out).double().numpy()


def _mlp_layers(path: Path, scorer: str, in_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) of each Linear layer of an aesthetic head file, in index order, shapes chained."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not idx:
        raise ScorerError(f"scorer {scorer!r}: {path} has no `layers.<i>.weight` tensors (keys: {sorted(state)[:5]})")
    layers, dim = [], in_dim
    for i in idx:
        w, b = state[f"layers.{i}.weight"].float(), state.get(f"layers.{i}.bias")
        if w.ndim != 2 or w.shape[1] != dim:
            raise ScorerError(f"scorer {scorer!r}: {path}: layers.{i}.weight has shape {tuple(w.shape)}, expected "
                              f"[*, {dim}] (the CLIP image embedding is {in_dim}-d)")
        layers.append((w, torch.zeros(w.shape[0]) if b is None else b.float()))
        dim = w.shape[0]
    if dim != 1:
        raise ScorerError(f"scorer {scorer!r}: {path}: the last layer has {dim} outputs, expected 1")
    return layers


class AestheticScore(ClipBase):
    """The LAION improved-aesthetic-predictor: a linear MLP on the normalised CLIP image embedding."""

    def __init__(self, name: str, path: str | Path, device: torch.device):
        root = check_dir(name, path, ("config.json", AESTHETIC_WEIGHTS))
        super().__init__(name, root, device)
        dim = int(self.model.config.projection_dim)
        self.layers = [(w.to(device), b.to(device)) for w, b in _mlp_layers(root / AESTHETIC_WEIGHTS, name, dim)]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] aesthetic scores (LAION scale, about 1-10)."""
        out = []
        for s in batches(images.shape[0], self.batch):
            h = self.image_embeds(images[s])
            for w, b in self.layers:
                h = torch.nn.functional.linear(h, w, b)
            out.append(h[:, 0].cpu())
        return torch.cat(out).double().numpy()


register_scorer("pickscore", lambda path, device: PickScore("pickscore", path, device))
register_scorer("clip", lambda path, device: ClipScore("clip", path, device))
register_scorer("aesthetic", lambda path, device: AestheticScore("aesthetic", path, device))
