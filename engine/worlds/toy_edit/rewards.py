"""Analytic rewards of the editing world, computed from pixels (no learned scorer); each in [0, 1].

A pixel "is" a palette colour when it lies within RADIUS (L2 in [-1, 1] RGB) of it; palette colours are >= 1.0
apart (world.TIMES), so the balls are disjoint, and a noise image has ~3-6% of its pixels in any one ball.

- `t2i_score` (prompt only): mean of four terms: the named colours present as square components (fraction), those
  components square (fill of their bounding box), the exact number of squares, and the background: the fraction of
  non-object pixels that are the prompt time's sky (rows < HORIZON) or ground colour.
- `local_scores` (source, output, recolour prompt): `correct` = fraction of the source's named object's pixels
  that are the new colour in the output; `preserve` = fraction of the other pixels (outside the object dilated by
  one pixel, which forgives a soft rim) within RADIUS of the source. The capability score is correct x preserve
  (GEdit-style: the edit was made and nothing else changed): a copy of the source, the wrong colour or the wrong
  object score 0.
- `global_scores` (source, output, relight prompt): `correct` = fraction of the background pixels (outside the
  source's objects dilated by one) that are the new time's sky/ground colour; `layout` = fraction of the source's
  object pixels unchanged (within RADIUS of the source); score = correct x layout.

`score_row` gives the table row: t2i, local_edit, global_edit (the capability scores), preservation (mean of the
edit rows' preserve/layout terms: "everything that should not change did not"), average (mean of the four).
Images: [B, 3, 16, 16] tensors or arrays in [-1, 1]; sources likewise (None for T2I rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.worlds.pixels import as_images, components
from engine.worlds.toy_edit.world import (
    COLORS,
    HORIZON,
    IMAGE_SIZE,
    TIMES,
    GlobalEdit,
    LocalEdit,
    T2ISpec,
    parse_prompt,
)

COLUMNS: tuple[str, ...] = ("t2i", "local_edit", "global_edit", "preservation", "average")
RADIUS = 0.45
MIN_AREA = 8  # a rendered square has 36 px
SQUARE_FILL = 0.78


def near(image: np.ndarray, color: Sequence[float] | np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels of `image` [3, H, W] within RADIUS of `color` ([3] or a [3, H, W] map)."""
    c = np.asarray(color, np.float64)
    c = c[:, None, None] if c.ndim == 1 else c
    return np.linalg.norm(image - c, axis=0) < RADIUS


def background_map(time: str) -> np.ndarray:
    """[3, H, W] the expected background colour of every pixel at `time`."""
    sky, ground = (np.array(c, np.float64) for c in TIMES[time])
    out = np.empty((3, IMAGE_SIZE, IMAGE_SIZE))
    out[:, :HORIZON] = sky[:, None, None]
    out[:, HORIZON:] = ground[:, None, None]
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by one pixel (4-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def detect_squares(image: np.ndarray) -> list[dict]:
    """Objects: components (>= MIN_AREA px) of pixels near an object colour; colour, squareness, pixel mask."""
    found = []
    for name, color in COLORS.items():
        for comp in components(near(image, color)):
            if len(comp) < MIN_AREA:
                continue
            box = (np.ptp(comp[:, 0]) + 1) * (np.ptp(comp[:, 1]) + 1)
            found.append(dict(color=name, square=len(comp) / box >= SQUARE_FILL, pixels=comp))
    return found


def object_pixels(image: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels near any object colour (the objects of a rendered source)."""
    return np.logical_or.reduce([near(image, c) for c in COLORS.values()])


# ---------------------------------------------------------------------------------------------------- T2I


def t2i_terms(image: np.ndarray, spec: T2ISpec) -> dict[str, float]:
    """The four T2I terms of `image` for `spec`: present, square, count, background (see the module docstring)."""
    found = detect_squares(image)
    hits = [next((f for f in found if f["color"] == c), None) for c in spec.colors]
    present = float(np.mean([h is not None for h in hits]))
    square = float(np.mean([h is not None and h["square"] for h in hits]))
    count = present * float(len(found) == len(spec.colors))
    bg_pixels = ~object_pixels(image)
    bg = float(near(image, background_map(spec.time))[bg_pixels].mean()) if bg_pixels.any() else 0.0
    return dict(present=present, square=square, count=count, background=bg)


def t2i_score(image: np.ndarray, spec: T2ISpec) -> float:
    """The T2I reward: the mean of `t2i_terms`."""
    return float(np.mean(list(t2i_terms(image, spec).values())))


# ---------------------------------------------------------------------------------------------------- edits


def local_scores(source: np.ndarray, image: np.ndarray, spec: LocalEdit) -> dict[str, float]:
    """correct, preserve, score of a recolour (see the module docstring)."""
    obj = near(source, COLORS[spec.src])
    if not obj.any():
        raise ValueError(f"the source has no {spec.src} square to recolour")
    correct = float(near(image, COLORS[spec.dst])[obj].mean())
    rest = ~dilate(obj)
    preserve = float(near(image, source)[rest].mean())
    return dict(correct=correct, preserve=preserve, score=correct * preserve)


def global_scores(source: np.ndarray, image: np.ndarray, spec: GlobalEdit) -> dict[str, float]:
    """correct, layout, score of a relight (see the module docstring)."""
    obj = object_pixels(source)
    bg = ~dilate(obj)
    correct = float(near(image, background_map(spec.time))[bg].mean())
    layout = float(near(image, source)[obj].mean()) if obj.any() else 1.0
    return dict(correct=correct, preserve=layout, score=correct * layout)


# -------------------------------------------------------------------------------------------------- rows


def item_scores(image: np.ndarray, prompt: str, source: np.ndarray | None) -> dict[str, float]:
    """{"task", "score", and for edits "correct", "preserve"} of one output."""
    spec = parse_prompt(prompt)
    if isinstance(spec, T2ISpec):
        return dict(task="t2i", score=t2i_score(image, spec))
    if source is None:
        raise ValueError(f"edit prompt without a source image: {prompt!r}")
    s = local_scores(source, image, spec) if isinstance(spec, LocalEdit) else global_scores(source, image, spec)
    return dict(task=spec.task, **s)


def score_row(images: torch.Tensor | np.ndarray, prompts: Sequence[str],
              sources: Sequence[np.ndarray | None]) -> dict[str, float]:
    """The table row of a set of outputs (tasks absent from `prompts` are NaN; the average covers the rest)."""
    x = as_images(images)
    if not len(prompts) == len(sources) == x.shape[0]:
        raise ValueError(f"{len(prompts)} prompts, {len(sources)} sources for {x.shape[0]} images")
    items = [item_scores(x[i], p, None if s is None else as_images(np.asarray(s)[None])[0])
             for i, (p, s) in enumerate(zip(prompts, sources))]
    row: dict[str, float] = {}
    for task in ("t2i", "local_edit", "global_edit"):
        vals = [it["score"] for it in items if it["task"] == task]
        row[task] = float(np.mean(vals)) if vals else float("nan")
    keep = [it["preserve"] for it in items if it["task"] != "t2i"]
    row["preservation"] = float(np.mean(keep)) if keep else float("nan")
    for task in ("local_edit", "global_edit"):
        vals = [it["correct"] for it in items if it["task"] == task]
        row[f"{task}_correct"] = float(np.mean(vals)) if vals else float("nan")
    row["average"] = float(np.nanmean([row[c] for c in COLUMNS[:-1]]))
    return row
