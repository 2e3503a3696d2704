"""The miniature world (DESIGN §4): structured prompts with task tags and a deterministic renderer.

Images are 3x16x16 RGB in [-1, 1], used directly as the transformer's latents (in_channels 3, patch 2,
64 image tokens). Three capabilities, in the roles of the paper's benchmarks:

- `[compose]` (GenEval): coloured squares on grey: single objects, colours, counts (two/three) and
  positions ("a red square left of a blue square"). Objects are 6x6 squares on the patch grid. (A second
  shape, a plus sign, was tried: at 16x16 and ~10 CPU-minutes of training the base could not draw the
  two apart, 10-20% right, so the objects differ by colour only.)
- `[text]` (OCR): a two-digit number in a 3x5 bitmap font at 2x scale, white on black.
- `[aesthetic]` (PickScore): a scene, "a dusk sky over a desert": vertical sky gradient, a sun or moon,
  ground band below a fixed horizon.

The `quality` score (DeQA role) is computed on every image (engine/toy/rewards.py).

The base model is trained on a deliberately imperfect mixture (`base_example`): captions that do not match
their image (label noise) and degraded images (noise, blur, washed-out colours), the way web data is. The
experts see only their own task's clean, correctly captioned targets (`clean_example`).

Everything is deterministic given a `numpy.random.Generator`; the prompt sets use fixed seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from engine.worlds.pixels import DEGRADATIONS, degrade  # noqa: F401 (DEGRADATIONS re-exported)

IMAGE_SIZE = 16
CHANNELS = 3
TASKS: tuple[str, ...] = ("compose", "text", "aesthetic")

# ----------------------------------------------------------------------------------------------- palette

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
COMPOSE_BG = (0.0, 0.0, 0.0)
SHAPES: tuple[str, ...] = ("square",)
PLURAL = {"square": "squares"}
COUNT_WORDS = {2: "two", 3: "three"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OBJ = 6  # object side in pixels: 3x3 patches
GAP = 2  # empty pixels between objects, so that each is its own connected component
GRID = 2  # object positions snap to multiples of the patch size: an object covers exactly 3x3 patches

TEXT_BG, TEXT_INK = -1.0, 1.0
TEXT_SCALE = 2  # 3x5 font -> 6x10 glyphs; two glyphs + 2 px gap = 14x10
GLYPH_W, GLYPH_H = 3 * TEXT_SCALE, 5 * TEXT_SCALE
TEXT_PITCH = GLYPH_W + 2
TEXT_OFFSETS_X = (0,)  # fixed, even offsets: each 2x2 glyph cell is exactly one 2x2 patch
TEXT_OFFSETS_Y = (2,)
FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


def _rgb(r: float, g: float, b: float) -> tuple[float, float, float]:
    """[0, 1] colour -> [-1, 1]."""
    return (2 * r - 1, 2 * g - 1, 2 * b - 1)


# time of day -> (sky at the top, sky at the horizon, sun or moon)
TIMES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "noon": (_rgb(0.15, 0.45, 0.95), _rgb(0.7, 0.85, 1.0), _rgb(1.0, 0.95, 0.2)),
    "dusk": (_rgb(0.3, 0.1, 0.45), _rgb(1.0, 0.5, 0.2), _rgb(1.0, 0.9, 0.5)),
    "night": (_rgb(0.0, 0.0, 0.1), _rgb(0.1, 0.1, 0.4), _rgb(0.95, 0.95, 0.95)),
    "dawn": (_rgb(0.55, 0.4, 0.75), _rgb(1.0, 0.75, 0.65), _rgb(1.0, 1.0, 0.2)),
}
PLACES: dict[str, tuple[float, float, float]] = {
    "sea": _rgb(0.0, 0.2, 0.5),
    "field": _rgb(0.15, 0.55, 0.1),
    "desert": _rgb(0.85, 0.65, 0.3),
    "snow": _rgb(0.95, 0.95, 0.95),
}
HORIZON = 10  # rows 0..9 sky, 10..15 ground (about the rule of thirds at 16 px)
SUN_R2 = 5.0  # disk x^2 + y^2 <= 5 on the 5x5 grid: 21 pixels
SUN_CX = (3, 12)  # inclusive ranges of the sun centre
SUN_CY = (2, 6)


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class Obj:
    """One coloured square of a compose prompt."""
    color: str
    shape: str


@dataclass(frozen=True)
class ComposeSpec:
    """`objects` with a `relation` between objects[0] and objects[1] (position prompts), or copies (counts)."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    task = "compose"

    @property
    def kind(self) -> str:
        """The prompt template: single, count or relation."""
        if self.relation is not None:
            return "position"
        return "single" if len(self.objects) == 1 else "count"


@dataclass(frozen=True)
class TextSpec:
    """A two-digit number of a text prompt."""
    digits: str

    task = "text"


@dataclass(frozen=True)
class SceneSpec:
    """A time of day and a place of an aesthetic prompt."""
    time: str
    place: str

    task = "aesthetic"


Spec = ComposeSpec | TextSpec | SceneSpec


def _obj_words(o: Obj) -> str:
    return f"a {o.color} {o.shape}"


def prompt_of(spec: Spec) -> str:
    """The canonical prompt of a spec (the inverse of `parse_prompt`)."""
    if isinstance(spec, ComposeSpec):
        if spec.kind == "single":
            return f"[compose] {_obj_words(spec.objects[0])}"
        if spec.kind == "count":
            o = spec.objects[0]
            return f"[compose] {COUNT_WORDS[len(spec.objects)]} {o.color} {PLURAL[o.shape]}"
        a, b = spec.objects
        return f"[compose] {_obj_words(a)} {spec.relation} {_obj_words(b)}"
    if isinstance(spec, TextSpec):
        return f"[text] the number {spec.digits}"
    return f"[aesthetic] a {spec.time} sky over the {spec.place}"


_COL = "|".join(COLORS)
_SHP = "|".join(SHAPES)
_REL = "|".join(RELATIONS)
_RE_SINGLE = re.compile(rf"^\[compose\] a ({_COL}) ({_SHP})$")
_RE_COUNT = re.compile(rf"^\[compose\] ({'|'.join(WORD_COUNTS)}) ({_COL}) ({'|'.join(PLURAL.values())})$")
_RE_POS = re.compile(rf"^\[compose\] a ({_COL}) ({_SHP}) ({_REL}) a ({_COL}) ({_SHP})$")
_RE_TEXT = re.compile(r"^\[text\] the number ([0-9]{2})$")
_RE_SCENE = re.compile(rf"^\[aesthetic\] a ({'|'.join(TIMES)}) sky over the ({'|'.join(PLACES)})$")


def parse_prompt(prompt: str) -> Spec:
    """Spec of a world prompt; ValueError for anything outside the world's grammar."""
    p = " ".join(prompt.strip().split())
    if m := _RE_SINGLE.match(p):
        return ComposeSpec((Obj(m[1], m[2]),))
    if m := _RE_COUNT.match(p):
        shape = next(s for s, pl in PLURAL.items() if pl == m[3])
        return ComposeSpec((Obj(m[2], shape),) * WORD_COUNTS[m[1]])
    if m := _RE_POS.match(p):
        a, b = Obj(m[1], m[2]), Obj(m[4], m[5])
        if a == b:
            raise ValueError(f"position prompt with two identical objects: {prompt!r}")
        return ComposeSpec((a, b), m[3])
    if m := _RE_TEXT.match(p):
        return TextSpec(m[1])
    if m := _RE_SCENE.match(p):
        return SceneSpec(m[1], m[2])
    raise ValueError(f"not a prompt of the toy world: {prompt!r}")


def task_of(prompt: str) -> str:
    """The task tag of a prompt ('compose', 'text', 'aesthetic')."""
    m = re.match(r"^\s*\[(\w+)\]", prompt)
    if m is None or m[1] not in TASKS:
        raise ValueError(f"prompt has no known task tag {[f'[{t}]' for t in TASKS]}: {prompt!r}")
    return m[1]


# ------------------------------------------------------------------------------------------ prompt space


def all_specs(task: str) -> list[Spec]:
    """Every spec of a task, in a fixed order."""
    objs = [Obj(c, s) for c in COLORS for s in SHAPES]
    if task == "compose":
        out: list[Spec] = [ComposeSpec((o,)) for o in objs]
        out += [ComposeSpec((o,) * n) for n in COUNT_WORDS for o in objs]
        out += [ComposeSpec((a, b), r) for r in RELATIONS for a in objs for b in objs if a != b]
        return out
    if task == "text":
        return [TextSpec(f"{n:02d}") for n in range(10, 100)]
    if task == "aesthetic":
        return [SceneSpec(t, p) for t in TIMES for p in PLACES]
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


def sample_spec(task: str, rng: np.random.Generator) -> Spec:
    """A random spec of `task`; compose draws single/count/position with probabilities 1/4, 1/4, 1/2."""
    if task == "compose":
        objs = [Obj(c, s) for c in COLORS for s in SHAPES]
        kind = rng.choice(3, p=[0.25, 0.25, 0.5])
        a = objs[rng.integers(len(objs))]
        if kind == 0:
            return ComposeSpec((a,))
        if kind == 1:
            return ComposeSpec((a,) * int(rng.integers(2, 4)))
        b = objs[rng.integers(len(objs) - 1)]
        b = b if b != a else objs[-1]
        return ComposeSpec((a, b), RELATIONS[rng.integers(len(RELATIONS))])
    if task == "text":
        return TextSpec(f"{int(rng.integers(10, 100)):02d}")
    if task == "aesthetic":
        return SceneSpec(list(TIMES)[rng.integers(len(TIMES))], list(PLACES)[rng.integers(len(PLACES))])
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


EVAL_SEED = 1234
EVAL_COUNTS = {"compose": 18, "text": 16, "aesthetic": 16}


def eval_prompts(task: str | None = None) -> list[str]:
    """The fixed evaluation prompts (all tasks when `task` is None), held out from `train_prompts`.

    compose: 2 single + 4 count + 12 position prompts (of 4 + 8 + 48); text: 16 numbers (of 90); aesthetic:
    all 16 scenes (the space has only 16, so its train and eval sets are the same scenes; the others are disjoint).
    """
    if task is None:
        return [p for t in TASKS for p in eval_prompts(t)]
    rng = np.random.default_rng(EVAL_SEED)
    specs = all_specs(task)
    if task == "compose":
        by_kind: dict[str, list[Spec]] = {"single": [], "count": [], "position": []}
        for s in specs:
            by_kind[s.kind].append(s)
        picked: list[Spec] = []
        for kind, n in (("single", 2), ("count", 4), ("position", 12)):
            idx = rng.permutation(len(by_kind[kind]))[:n]
            picked += [by_kind[kind][i] for i in sorted(idx)]
        return [prompt_of(s) for s in picked]
    if task == "text":
        idx = rng.permutation(len(specs))[: EVAL_COUNTS["text"]]
        return [prompt_of(specs[i]) for i in sorted(idx)]
    return [prompt_of(s) for s in specs]


def train_prompts(task: str | None = None) -> list[str]:
    """The OPD training prompts: the task's prompt space minus the eval prompts (aesthetic: all 16)."""
    if task is None:
        return [p for t in TASKS for p in train_prompts(t)]
    held = set(eval_prompts(task)) if task != "aesthetic" else set()
    return [p for p in (prompt_of(s) for s in all_specs(task)) if p not in held]


# ---------------------------------------------------------------------------------------------- renderer


_MASKS = {"square": np.ones((OBJ, OBJ), dtype=bool)}
_GLYPHS = {
    d: np.kron(np.array([[ch == "1" for ch in row] for row in rows], dtype=bool), np.ones((TEXT_SCALE,) * 2, bool))
    for d, rows in FONT.items()
}
_SUN = (lambda yy, xx: yy**2 + xx**2 <= SUN_R2)(*np.mgrid[-2:3, -2:3])


def _separate(p: tuple[int, int], q: tuple[int, int]) -> bool:
    return abs(p[0] - q[0]) >= OBJ + GAP or abs(p[1] - q[1]) >= OBJ + GAP


def _relation_holds(a: tuple[int, int], b: tuple[int, int], rel: str) -> bool:
    """Layout rule of the renderer: clear offset on the named axis, smaller offset on the other."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= OBJ + GAP and abs(across) <= GRID


def layout(spec: ComposeSpec, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left (y, x) of each object: inside the image, pairwise separated, relation respected."""
    hi = IMAGE_SIZE - OBJ
    for _ in range(10_000):
        pos = [(GRID * int(rng.integers(0, hi // GRID + 1)), GRID * int(rng.integers(0, hi // GRID + 1)))
               for _ in spec.objects]
        if not all(_separate(p, q) for i, p in enumerate(pos) for q in pos[i + 1 :]):
            continue
        if spec.relation is not None and not _relation_holds(pos[0], pos[1], spec.relation):
            continue
        return pos
    raise RuntimeError(f"no layout found for {spec}")  # cannot happen for the world's specs


def render(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth image of `spec`: float32 [3, 16, 16] in [-1, 1]; layout randomness drawn from `rng`."""
    img = np.empty((CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    if isinstance(spec, ComposeSpec):
        img[:] = np.array(COMPOSE_BG, np.float32)[:, None, None]
        for o, (y, x) in zip(spec.objects, layout(spec, rng)):
            region = img[:, y : y + OBJ, x : x + OBJ]
            region[:, _MASKS[o.shape]] = np.array(COLORS[o.color], np.float32)[:, None]
        return img
    if isinstance(spec, TextSpec):
        img[:] = TEXT_BG
        x0 = TEXT_OFFSETS_X[rng.integers(len(TEXT_OFFSETS_X))]
        y0 = TEXT_OFFSETS_Y[rng.integers(len(TEXT_OFFSETS_Y))]
        for k, d in enumerate(spec.digits):
            region = img[:, y0 : y0 + GLYPH_H, x0 + k * TEXT_PITCH : x0 + k * TEXT_PITCH + GLYPH_W]
            region[:, _GLYPHS[d]] = TEXT_INK
        return img
    img[:] = scene_background(spec)
    cy = int(rng.integers(SUN_CY[0], SUN_CY[1] + 1))
    cx = int(rng.integers(SUN_CX[0], SUN_CX[1] + 1))
    img[:, cy - 2 : cy + 3, cx - 2 : cx + 3][:, _SUN] = np.array(TIMES[spec.time][2], np.float32)[:, None]
    return img


def scene_background(spec: SceneSpec) -> np.ndarray:
    """The scene without its sun: [3, 16, 16] sky gradient over a flat ground (the aesthetic reward's ideal)."""
    top, bottom, _ = (np.array(c, np.float32) for c in TIMES[spec.time])
    t = np.linspace(0.0, 1.0, HORIZON, dtype=np.float32)[:, None]
    img = np.empty((CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:, :HORIZON] = ((1 - t) * top + t * bottom).T[:, :, None]
    img[:, HORIZON:] = np.array(PLACES[spec.place], np.float32)[:, None, None]
    return img


def digit_templates() -> np.ndarray:
    """[10, GLYPH_H, GLYPH_W] glyphs of '0'..'9' as +-1 (for the OCR reward)."""
    return np.stack([np.where(_GLYPHS[str(d)], 1.0, -1.0) for d in range(10)]).astype(np.float32)


# ------------------------------------------------------------------------------------- base data (imperfect)


@dataclass(frozen=True)
class Imperfection:
    """How the base model's training mixture differs from clean data (per example probabilities)."""

    label_noise: float = 0.4
    """The caption describes a perturbed version of the image (one attribute, digit or scene part changed)."""
    degrade: float = 0.4
    """The image is degraded: gaussian noise, 3x3 blur or washed-out colours (one, uniformly)."""
    noise_std: float = 0.3
    wash: float = 0.5


def perturb(spec: Spec, rng: np.random.Generator) -> Spec:
    """A spec that differs from `spec` in one attribute (the image a wrong caption was written for)."""
    if isinstance(spec, ComposeSpec):
        if spec.kind == "position" and rng.random() < 0.5:
            return replace(spec, objects=spec.objects[::-1])  # relation flipped
        if spec.kind == "count" and rng.random() < 0.5:
            n = len(spec.objects)
            return ComposeSpec((spec.objects[0],) * (n - 1 if n == 3 or rng.random() < 0.5 else n + 1))
        k = int(rng.integers(len(spec.objects))) if spec.kind == "position" else 0
        taken = {o.color for o in spec.objects}
        colors = [c for c in COLORS if c not in taken]
        new = Obj(colors[rng.integers(len(colors))], spec.objects[k].shape)
        if spec.kind == "position":
            objs = list(spec.objects)
            objs[k] = new
            return replace(spec, objects=tuple(objs))
        return ComposeSpec((new,) * len(spec.objects))
    if isinstance(spec, TextSpec):
        k = int(rng.integers(2))
        digits = [d for d in "0123456789" if d != spec.digits[k]]
        if k == 0:
            digits = [d for d in digits if d != "0"]
        new = list(spec.digits)
        new[k] = digits[rng.integers(len(digits))]
        return TextSpec("".join(new))
    if rng.random() < 0.5:
        times = [t for t in TIMES if t != spec.time]
        return SceneSpec(times[rng.integers(len(times))], spec.place)
    places = [p for p in PLACES if p != spec.place]
    return SceneSpec(spec.time, places[rng.integers(len(places))])


def clean_example(task: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """(prompt, ground-truth image) of `task`: the experts' fine-tuning data."""
    spec = sample_spec(task, rng)
    return prompt_of(spec), render(spec, rng)


BASE_TASK_MIX = (0.5, 0.25, 0.25)
"""Task probabilities of the base mixture (compose, the hardest to draw, gets half)."""


def base_example(rng: np.random.Generator, imp: Imperfection = Imperfection()) -> tuple[str, np.ndarray]:
    """(prompt, image) from the base model's imperfect mixture: BASE_TASK_MIX, label noise, degradations."""
    task = TASKS[rng.choice(len(TASKS), p=BASE_TASK_MIX)]
    spec = sample_spec(task, rng)
    shown = perturb(spec, rng) if rng.random() < imp.label_noise else spec
    img = render(shown, rng)
    if rng.random() < imp.degrade:
        img = degrade(img, rng, imp)
    return prompt_of(spec), img


def batch(examples: list[tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """(prompts, images [N, 3, 16, 16]) of a list of examples."""
    prompts = [p for p, _ in examples]
    return prompts, np.stack([x for _, x in examples])


VOCAB: tuple[str, ...] = tuple(
    sorted(
        {f"[{t}]" for t in TASKS}
        | set(COLORS)
        | set(SHAPES)
        | set(PLURAL.values())
        | set(WORD_COUNTS)
        | {w for r in RELATIONS for w in r.split()}
        | set(TIMES)
        | set(PLACES)
        | {"a", "the", "number", "sky", "over"}
        | set("0123456789")
    )
)
"""Every word of the world's grammar, sorted (the toy text encoder's vocabulary; numbers are split into digits)."""
