"""OCR accuracy: the text between the prompt's first pair of double quotes, read back from the image.

The reward is flow_grpo's (Flow-OPD `flow_grpo/ocr.py:34-62`): target = `prompt.split('"')[1]`; spaces removed and
lower-cased on both sides; distance 0 when the target occurs in the reading, else the Levenshtein distance,
capped at len(target); score = 1 - distance / len(target).

Readers:
- a transformers OCR model from a local dir (`VisionEncoderDecoderModel` + its processor, e.g. TrOCR), run on the
  whole image with greedy decoding. TrOCR reads single text lines, so on a full scene this approximates the
  reference reader (PaddleOCR: text detection, then recognition of each box);
- PaddleOCR itself, when the `paddleocr` package is installed and the dir holds its `det/` and `rec/` inference
  models (what flow_grpo uses, `ocr.py:12-19`: use_angle_cls=False, lang="en"; lines joined as there, line 41).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    load_pretrained,
    to_pil,
)

MAX_NEW_TOKENS = 64  # Flow-OPD's OCR targets are short phrases ("Step Goal Achieved": 18 characters)


def target_text(prompt: str) -> str | None:
    """The quoted text of an OCR prompt (`... that reads "Try Our New Burger" ...`), or None without quotes."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 and parts[1].strip() else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_reward(reading: str, target: str) -> float:
    """flow_grpo's OCR reward of `reading` for `target` (module docstring)."""
    got, want = reading.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not want:
        return 0.0
    dist = 0 if want in got else min(levenshtein(got, want), len(want))
    return 1.0 - dist / len(want)


class OcrScorer(BaseScorer):
    """OCR accuracy of images whose prompt quotes a text."""

    name = "ocr"
    batch = 8

    def __init__(self, path: str | Path, device: torch.device):
        root = Path(path)
        self.device = device
        if (root / "det").is_dir() and (root / "rec").is_dir():
            self.read = self._paddle(root)
            return
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        root = check_processor(self.name, check_dir(self.name, path, ("config.json",)))
        self.processor = load_pretrained(self.name, root, AutoProcessor.from_pretrained)
        self.model = load_pretrained(
            self.name, root, lambda p: VisionEncoderDecoderModel.from_pretrained(p, local_files_only=True))
        self.model = self.model.eval().requires_grad_(False).to(device)
        self.read = self._transformers

    def _paddle(self, root: Path) -> Any:
        try:
            from paddleocr import PaddleOCR
        except ImportError as exc:
            raise ScorerError(f"scorer 'ocr': {root} holds PaddleOCR models (det/, rec/) but the paddleocr package "
                              f"is not installed (pip install paddleocr==2.9.1, as Flow-OPD's README says)") from exc
        ocr = PaddleOCR(use_angle_cls=False, lang="en", det_model_dir=str(root / "det"),
                        rec_model_dir=str(root / "rec"), use_gpu=self.device.type == "cuda", show_log=False)

        def read(images: torch.Tensor) -> list[str]:
            out = []
            for img in to_pil(images):
                result = ocr.ocr(np.asarray(img), cls=False)
                out.append("".join(r[1][0] for r in result[0] if r[1][1] > 0) if result and result[0] else "")
            return out

        return read

    @torch.no_grad()
    def _transformers(self, images: torch.Tensor) -> list[str]:
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        ids = self.model.generate(pixel_values=pixels.to(self.device, self.model.dtype), max_new_tokens=MAX_NEW_TOKENS,
                                  num_beams=1, do_sample=False)
        return list(self.processor.batch_decode(ids, skip_special_tokens=True))

    def applies(self, prompt: str, metadata: Metadata) -> bool:
        """Prompts with a quoted text."""
        return target_text(prompt) is not None

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] OCR accuracies in [0, 1]; ScorerError for a prompt without a quoted text."""
        targets = [target_text(p) for p in prompts]
        if None in targets:
            raise ScorerError(f"scorer 'ocr': prompt without a quoted text: {prompts[targets.index(None)]!r}")
        readings: list[str] = []
        for s in batches(len(prompts), self.batch):
            readings += self.read(images[s])
        return np.array([ocr_reward(r, t) for r, t in zip(readings, targets)], dtype=np.float64)


register_scorer("ocr", lambda path, device: OcrScorer(path, device))
