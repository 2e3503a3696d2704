"""Analytic rewards of the miniature world, computed from pixels by code (no learned scorer).

Per task a score in [0, 1] on that task's prompts, in the role of the paper's benchmark:
- `compose_score` (GenEval): segments the image into palette-coloured connected components (objects),
  calls each a square if it fills its bounding box (else a malformed blob), and scores existence, shape,
  exact count and the spatial relation, each a fraction of the prompt's objects (an image without the
  right colours scores 0).
- `text_score` (OCR): reads the two digits by normalised cross-correlation against the font over the
  layout offsets; the fraction of digits read correctly (1 - edit distance for equal lengths).
- `aesthetic_score` (PickScore): closeness of the image to the scene's ideal sky gradient and ground
  (mean L1 outside the sun), times the presence of one sun/moon disk of the right colour in the sky.
And on every image `quality` (DeQA): clean (5-point median residual), sharp (edges are steps, not ramps),
with content (some edges at all) and contrast (values reach the palette's extremes, not washed out).
`average` = mean(compose, text, aesthetic, quality), the paper's average over its four scores.

Images: [B, 3, 16, 16] tensors or arrays in [-1, 1]; rewards come back as float64 numpy [B].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.worlds.pixels import as_images, components
from engine.worlds.toy.world import (
    COLORS,
    COMPOSE_BG,
    GLYPH_H,
    GLYPH_W,
    HORIZON,
    IMAGE_SIZE,
    TASKS,
    TEXT_PITCH,
    TIMES,
    ComposeSpec,
    SceneSpec,
    TextSpec,
    digit_templates,
    parse_prompt,
    scene_background,
)

COLUMNS: tuple[str, ...] = (*TASKS, "quality", "average")

# compose: a pixel belongs to colour k if k is its nearest of {grey, the 4 colours} and within 1.0 of it
# (pure colours are 1.73 from grey and 2.0 from each other); components smaller than 8 px are noise
# (a rendered square has 36).
_PALETTE = np.array([COMPOSE_BG, *COLORS.values()], dtype=np.float64)
_COLOR_NAMES = ("bg", *COLORS)
COLOR_RADIUS = 1.0
MIN_AREA = 8
SQUARE_FILL = 0.78  # a rendered square fills 1.0 of its box; a ragged or merged blob less
REL_MARGIN = 3.0  # centroid offset (px) on the named axis, and it must dominate the other axis

# text: a digit counts as read if it is the best template and correlates >= 0.6 (noise patches of 60 px
# reach ~0.45 at best over 10 templates x 18 offsets)
NCC_MIN = 0.6
OCR_X = (0, 1, 2)
OCR_Y = (1, 2, 3, 4, 5, 6)

# aesthetic: fit = clip(1 - L1/AESTHETIC_L1, 0, 1); a sun is >= SUN_MIN connected px of the sun colour
AESTHETIC_L1 = 0.3
SUN_MIN, SUN_MAX = 14, 30  # the rendered disk has 21 px
SUN_RADIUS = 0.6

# quality
CLEAN_TAU = 0.05  # exp(-residual / tau): the degradations' noise (std 0.3) has residual ~0.25 -> ~0
EDGE_RANGE = 0.8  # a channel's 3x3 range above this makes the pixel an edge pixel
CONTENT_MIN = 0.03  # fraction of edge (pixel, channel) pairs for full content score
# contrast: the 98th percentile of |x| must reach the palette's extremes (every rendered image has >= 9% of
# its values at +-1 or within 0.2 of it; washed-out images stop at 0.5)
CONTRAST_LO, CONTRAST_HI = 0.5, 0.9


# ------------------------------------------------------------------------------------------------ compose


def detect_objects(image: np.ndarray) -> list[dict]:
    """Objects of a compose image: colour, shape, area, centroid (y, x)."""
    pix = image.reshape(3, -1).T
    dist = np.linalg.norm(pix[:, None, :] - _PALETTE[None], axis=-1)
    label = dist.argmin(1)
    label[dist.min(1) > COLOR_RADIUS] = 0
    label = label.reshape(image.shape[1:])
    objects = []
    for k in range(1, len(_PALETTE)):
        for comp in components(label == k):
            if len(comp) < MIN_AREA:
                continue
            hgt = comp[:, 0].max() - comp[:, 0].min() + 1
            wid = comp[:, 1].max() - comp[:, 1].min() + 1
            fill = len(comp) / float(hgt * wid)
            objects.append(
                dict(
                    color=_COLOR_NAMES[k],
                    shape="square" if fill >= SQUARE_FILL else "blob",
                    area=len(comp),
                    center=comp.mean(0),
                )
            )
    return objects


def relation_holds(a: np.ndarray, b: np.ndarray, relation: str) -> bool:
    """Does an object at centroid `a` (y, x) stand in `relation` to one at `b`?"""
    dy, dx = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= REL_MARGIN and along >= abs(across)


def compose_score(image: np.ndarray, spec: ComposeSpec) -> float:
    """Mean of: objects present (by colour), with the right shape, exact object count, relation (if any)."""
    found = detect_objects(image)
    free = list(range(len(found)))
    matched: list[int | None] = []
    n_color = n_shape = 0
    for want in spec.objects:
        # prefer an exact (colour, shape) match, else colour only
        pick = next((i for i in free if found[i]["color"] == want.color and found[i]["shape"] == want.shape), None)
        if pick is not None:
            n_shape += 1
        else:
            pick = next((i for i in free if found[i]["color"] == want.color), None)
        if pick is not None:
            n_color += 1
            free.remove(pick)
        matched.append(pick)
    n = len(spec.objects)
    present = n_color / n
    terms = [present, n_shape / n, present * float(len(found) == n)]
    if spec.relation is not None:
        a, b = matched
        ok = a is not None and b is not None and relation_holds(found[a]["center"], found[b]["center"], spec.relation)
        terms.append(float(ok))
    return float(np.mean(terms))


# --------------------------------------------------------------------------------------------------- text

_TEMPLATES = digit_templates().astype(np.float64)
_T0 = _TEMPLATES.reshape(10, -1) - _TEMPLATES.reshape(10, -1).mean(1, keepdims=True)
_T0 /= np.linalg.norm(_T0, axis=1, keepdims=True)


def read_digits(image: np.ndarray, n_digits: int = 2) -> tuple[str, np.ndarray]:
    """OCR: (best reading, its per-digit correlations) over the layout offsets; '?' for an unreadable digit."""
    lum = image.mean(0)
    best: tuple[float, str, np.ndarray] | None = None
    for y0 in OCR_Y:
        for x0 in OCR_X:
            if y0 + GLYPH_H > IMAGE_SIZE or x0 + (n_digits - 1) * TEXT_PITCH + GLYPH_W > IMAGE_SIZE:
                continue
            patches = np.stack(
                [lum[y0 : y0 + GLYPH_H, x0 + k * TEXT_PITCH : x0 + k * TEXT_PITCH + GLYPH_W].ravel()
                 for k in range(n_digits)]
            )
            patches = patches - patches.mean(1, keepdims=True)
            norm = np.linalg.norm(patches, axis=1, keepdims=True)
            ncc = (patches @ _T0.T) / np.maximum(norm, 1e-8)  # [n_digits, 10]
            score = ncc.max(1).sum()
            if best is None or score > best[0]:
                best = (score, "".join(str(d) for d in ncc.argmax(1)), ncc.max(1))
    assert best is not None
    reading = "".join(d if c >= NCC_MIN else "?" for d, c in zip(best[1], best[2]))
    return reading, best[2]


def text_score(image: np.ndarray, spec: TextSpec) -> float:
    """1 when the two digits read back as the prompt's number, partial credit per digit."""
    reading, _ = read_digits(image, len(spec.digits))
    return float(np.mean([a == b for a, b in zip(reading, spec.digits)]))


# ---------------------------------------------------------------------------------------------- aesthetic


def aesthetic_score(image: np.ndarray, spec: SceneSpec) -> float:
    """fit to the ideal sky/ground outside the sun x (0.25 + 0.75 sun), sun = one disk of the sun colour."""
    ideal = scene_background(spec).astype(np.float64)
    sun_color = np.array(TIMES[spec.time][2], np.float64)[:, None, None]
    d_sun = np.linalg.norm(image - sun_color, axis=0)
    d_sky = np.linalg.norm(image - ideal, axis=0)
    sun_mask = (d_sun < SUN_RADIUS) & (d_sun < d_sky)
    sun_mask[HORIZON:] = False
    comps = components(sun_mask)
    largest = max((len(c) for c in comps), default=0)
    total = int(sun_mask.sum())
    sun = min(largest / SUN_MIN, 1.0) * float(np.clip((2 * SUN_MAX - total) / SUN_MAX, 0.0, 1.0))
    # dilate the sun mask by one pixel so anti-aliased rims of a generated disk are not counted as sky error
    grown = sun_mask.copy()
    grown[1:] |= sun_mask[:-1]
    grown[:-1] |= sun_mask[1:]
    grown[:, 1:] |= sun_mask[:, :-1]
    grown[:, :-1] |= sun_mask[:, 1:]
    l1 = np.abs(image - ideal).mean(0)[~grown].mean()
    fit = float(np.clip(1.0 - l1 / AESTHETIC_L1, 0.0, 1.0))
    return fit * (0.25 + 0.75 * sun)


# ------------------------------------------------------------------------------------------------ quality


def _shifts(images: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """[len(offsets), B, C, H, W] edge-padded shifted copies."""
    pad = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = images.shape[-2:]
    return np.stack([pad[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in offsets])


_PLUS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
_BOX = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def quality_terms(images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The four factors of `quality`, each [B] in [0, 1]."""
    x = as_images(images)
    residual = np.abs(x - np.median(_shifts(x, _PLUS), axis=0)).mean((1, 2, 3))
    box = _shifts(x, _BOX)
    lo, hi = box.min(0), box.max(0)
    rng = hi - lo
    edge = rng > EDGE_RANGE
    pos = (x - lo) / np.maximum(rng, 1e-8)
    ramp = edge & (pos > 0.2) & (pos < 0.8)
    n_edge = edge.sum((1, 2, 3))
    sharp = 1.0 - ramp.sum((1, 2, 3)) / np.maximum(n_edge, 1)
    p98 = np.quantile(np.abs(x).reshape(x.shape[0], -1), 0.98, axis=1)
    return dict(
        clean=np.exp(-residual / CLEAN_TAU),
        sharp=sharp,
        content=np.clip(n_edge / (edge[0].size * CONTENT_MIN), 0.0, 1.0),
        contrast=np.clip((p98 - CONTRAST_LO) / (CONTRAST_HI - CONTRAST_LO), 0.0, 1.0),
    )


def quality(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """No-reference quality in [0, 1] per image: clean * sharp * content * contrast."""
    t = quality_terms(images)
    return t["clean"] * t["sharp"] * t["content"] * t["contrast"]


# --------------------------------------------------------------------------------------------------- rows


def task_reward(images: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Each image's reward for its own prompt's task, [B] in [0, 1]."""
    x = as_images(images)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} images")
    out = np.empty(x.shape[0])
    for i, p in enumerate(prompts):
        spec = parse_prompt(p)
        if isinstance(spec, ComposeSpec):
            out[i] = compose_score(x[i], spec)
        elif isinstance(spec, TextSpec):
            out[i] = text_score(x[i], spec)
        else:
            out[i] = aesthetic_score(x[i], spec)
    return out


def score_row(images: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """The table row of a set of samples: mean task reward per task, mean quality, and the average.

    Tasks absent from `prompts` are NaN and the average then covers the columns present.
    """
    x = as_images(images)
    rewards = task_reward(x, prompts)
    tasks = np.array([parse_prompt(p).task for p in prompts])
    row = {t: float(rewards[tasks == t].mean()) if (tasks == t).any() else float("nan") for t in TASKS}
    row["quality"] = float(quality(x).mean())
    row["average"] = float(np.nanmean([row[c] for c in (*TASKS, "quality")]))
    return row
