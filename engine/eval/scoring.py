"""Score a set of images with several scorers: each scores the images its `applies` accepts (GenEval the rows with
GenEval metadata, OCR the prompts that quote a text, the others every image), and the set gets one value per
scorer (its `aggregate`) plus the Flow-OPD card's average when card scorers are among them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.eval.prompts import EvalPrompt
from engine.eval.scorers.base import Scorer
from engine.eval.table import AVERAGE, card_average


@dataclass
class ScoredSet:
    """Per-scorer values of one set of images."""
    values: dict[str, float]
    """scorer name -> aggregate (and `average`, the card's, when card scorers were given)."""
    per_image: dict[str, np.ndarray]
    """scorer name -> [N] scores, NaN where the scorer does not apply."""
    counts: dict[str, int]
    """scorer name -> images it scored."""


def score_set(scorers: Mapping[str, Scorer], images: torch.Tensor, prompts: Sequence[EvalPrompt]) -> ScoredSet:
    """Score `images` [N, 3, H, W] in [0, 1], row i of prompt `prompts[i]`, with every scorer."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    values: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, scorer in scorers.items():
        idx = [i for i, p in enumerate(prompts) if scorer.applies(p.text, p.metadata)]
        full = np.full(len(prompts), np.nan)
        if idx:
            meta = [prompts[i].metadata for i in idx]
            scores = np.asarray(scorer.score(images[idx], [prompts[i].text for i in idx], meta), dtype=np.float64)
            if scores.shape != (len(idx),):
                raise ValueError(f"scorer {name!r} returned shape {scores.shape} for {len(idx)} images")
            full[idx] = scores
            values[name] = scorer.aggregate(scores, meta)
        else:
            values[name] = float("nan")
        per_image[name], counts[name] = full, len(idx)
    avg = card_average(values)
    if avg is not None:
        values[AVERAGE] = avg
    return ScoredSet(values, per_image, counts)
