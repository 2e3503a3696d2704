"""The scorer interface: `score(images, prompts, metadata) -> one float per image`, plus the checks every local
scorer dir gets before anything is loaded (missing weights name the path and the scorer; a corrupt file is named).

Images are float tensors [B, 3, H, W] in [0, 1] (what `engine.eval.sampling.decode` returns); metadata is one
dict per image (a GenEval metadata row, or {"task": ...}). Scores come back as float64 numpy [B].
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

Metadata = Mapping[str, Any]


class ScorerError(RuntimeError):
    """A scorer that cannot be loaded or run as asked; the message names the scorer and the path, file or URL."""


class Scorer(Protocol):
    """One score per image."""

    name: str
    """The registry name (`validation.scorers` key, `--scorers name=PATH`)."""

    def applies(self, prompt: str, metadata: Metadata) -> bool:
        """Whether this scorer can score an image of `prompt` (OCR needs a quoted text, GenEval its metadata)."""
        ...

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] float64 scores of `images` [B, 3, H, W] in [0, 1] for their prompts."""
        ...

    def aggregate(self, scores: np.ndarray, metadata: Sequence[Metadata]) -> float:
        """One number for a set of per-image scores (the table cell)."""
        ...


class BaseScorer:
    """Defaults: every prompt applies, the aggregate is the mean."""

    name = ""

    def applies(self, prompt: str, metadata: Metadata) -> bool:
        """Every prompt."""
        return True

    def aggregate(self, scores: np.ndarray, metadata: Sequence[Metadata]) -> float:
        """The mean (NaN for no images)."""
        return float(np.mean(scores)) if len(scores) else float("nan")


def to_pil(images: torch.Tensor) -> list[Any]:
    """[B, 3, H, W] in [0, 1] -> PIL RGB images, rounded to uint8 as flow_grpo does (`(x * 255).round()`)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def embedding(out: Any) -> torch.Tensor:
    """A projected CLIP embedding: transformers 5's `get_*_features` return a ModelOutput holding it in
    `pooler_output` (earlier versions the tensor itself)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_dir(scorer: str, path: str | Path, required: Sequence[str] = ("config.json",)) -> Path:
    """`path` as a scorer weights dir whose `required` files exist and whose JSON and safetensors files parse (and
    match a SHA256SUMS when there is one); ScorerError naming the scorer and the path or the bad file otherwise."""
    from safetensors import safe_open

    from engine.files import verify_sha256sums

    root = Path(path)
    if not str(path) or not root.is_dir():
        raise ScorerError(f"scorer {scorer!r}: weights not found: {path or '(no path given)'} is not a directory "
                          f"(lay out the local weights as docs/evaluation.md says)")
    missing = [r for r in required if not (root / r).exists()]
    if missing:
        raise ScorerError(f"scorer {scorer!r}: weights not found: {', '.join(str(root / m) for m in missing)}")
    if bad := verify_sha256sums(root):
        raise ScorerError(f"scorer {scorer!r}: {bad[0]}")
    for f in sorted(root.rglob("*.json")):
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ScorerError(f"scorer {scorer!r}: corrupt file {f}: {exc}") from exc
    for f in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # safetensors raises SafetensorError / OSError for torn or garbage files
            raise ScorerError(f"scorer {scorer!r}: corrupt file {f}: {exc}") from exc
    return root


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub dirs have the first, transformers 5
# save_pretrained writes the second


def check_processor(scorer: str, root: Path) -> Path:
    """`root` when it holds a transformers processor config; ScorerError naming the files looked for otherwise."""
    if not any((root / f).is_file() for f in PROCESSOR_FILES):
        raise ScorerError(f"scorer {scorer!r}: weights not found: {root / PROCESSOR_FILES[0]} (or "
                          f"{PROCESSOR_FILES[1]}): the model's processor files")
    return root


def load_pretrained(scorer: str, path: Path, load: Any) -> Any:
    """`load(str(path))` (a transformers `from_pretrained`), its errors re-raised naming the scorer and the dir."""
    try:
        return load(str(path))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unusable dirs
        raise ScorerError(f"scorer {scorer!r}: cannot load {path}: {exc}") from exc
