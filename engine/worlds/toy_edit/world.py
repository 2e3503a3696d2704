"""The editing miniature world (DESIGN §4, issue 13): scenes, prompts with task tags, a deterministic renderer.

Images are 3x16x16 RGB in [-1, 1] and are the transformer's latents directly (identity "VAE", as in the T2I world;
the Z-Image VAE path is tested on the real AutoencoderKL in tests/test_zimage_backend.py). A scene is a time of day
(sky above row HORIZON, ground below, one flat colour each) and one or two 6x6 squares of distinct colours on the
2-px patch grid. Three capabilities, in the roles of DanceOPD's tables:

- `[t2i] a red square and a blue square at night`: draw the scene (layout free);
- `[local_edit] make the red square blue`: recolour the named object of the source, nothing else (GEdit's local
  edits: one object changes);
- `[global_edit] make it night`: change the whole scene's time of day, keep the objects where and as they are
  (GEdit's global edits: style/relighting of the whole image, layout preserved).

The base model is trained on a deliberately imperfect mixture (`base_example`): wrong captions or wrong edits
(label noise: a perturbed scene, the wrong colour, the wrong object, an edit that also changed the background, no
edit at all, a re-laid-out scene) and degraded targets (noise, blur, washed-out colours), the way scraped edit
pairs are. The experts see only their own task's clean examples (`clean_example`).

Everything is deterministic given a `numpy.random.Generator`; the eval sets use fixed seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from engine.worlds.pixels import DEGRADATIONS, degrade  # noqa: F401 (DEGRADATIONS re-exported)

IMAGE_SIZE = 16
CHANNELS = 3
TASKS: tuple[str, ...] = ("t2i", "local_edit", "global_edit")
EDIT_TASKS: tuple[str, ...] = ("local_edit", "global_edit")

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
# time -> (sky, ground). Every colour is >= 1.0 (L2, [-1, 1] RGB) from every object colour and from the same band
# of the other times, so a pixel within the rewards' radius 0.45 of one palette colour is unambiguous.
TIMES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "day": ((-0.3, 0.3, 0.9), (-0.4, 0.3, -0.6)),
    "dusk": ((0.5, -0.3, 0.1), (0.4, -0.3, -0.5)),
    "night": ((-0.8, -0.8, -0.4), (-0.5, -0.6, 0.1)),
}
HORIZON = 10  # rows 0..9 sky, 10..15 ground
OBJ = 6  # square side: 3x3 patches
GAP = 2  # empty pixels between squares (each its own connected component)
GRID = 2  # positions snap to the patch grid


@dataclass(frozen=True)
class Obj:
    """One coloured square at top-left corner (y, x)."""

    color: str
    y: int
    x: int


@dataclass(frozen=True)
class Scene:
    """A rendered scene: time of day and placed objects (top-left corners)."""

    time: str
    objects: tuple[Obj, ...]

    @property
    def colors(self) -> tuple[str, ...]:
        """The objects' colours in order."""
        return tuple(o.color for o in self.objects)


@dataclass(frozen=True)
class T2ISpec:
    """A T2I prompt: the time of day and the colours of its squares."""

    time: str
    colors: tuple[str, ...]
    task = "t2i"


@dataclass(frozen=True)
class LocalEdit:
    """A recolour: the square of colour `src` becomes `dst`."""

    src: str
    dst: str
    task = "local_edit"


@dataclass(frozen=True)
class GlobalEdit:
    """A relight: the whole scene at time `time`."""

    time: str
    task = "global_edit"


Spec = T2ISpec | LocalEdit | GlobalEdit


# ------------------------------------------------------------------------------------------------- prompts


def prompt_of(spec: Spec) -> str:
    """The canonical prompt (the inverse of `parse_prompt`)."""
    if isinstance(spec, T2ISpec):
        objs = " and ".join(f"a {c} square" for c in spec.colors)
        return f"[t2i] {objs} at {spec.time}"
    if isinstance(spec, LocalEdit):
        return f"[local_edit] make the {spec.src} square {spec.dst}"
    return f"[global_edit] make it {spec.time}"


_C = "|".join(COLORS)
_T = "|".join(TIMES)
_RE_T2I = re.compile(rf"^\[t2i\] a ({_C}) square(?: and a ({_C}) square)? at ({_T})$")
_RE_LOCAL = re.compile(rf"^\[local_edit\] make the ({_C}) square ({_C})$")
_RE_GLOBAL = re.compile(rf"^\[global_edit\] make it ({_T})$")


def parse_prompt(prompt: str) -> Spec:
    """Spec of a world prompt; ValueError for anything outside the grammar."""
    p = " ".join(prompt.strip().split())
    if m := _RE_T2I.match(p):
        colors = (m[1],) if m[2] is None else (m[1], m[2])
        if len(set(colors)) != len(colors):
            raise ValueError(f"two squares of one colour: {prompt!r}")
        return T2ISpec(m[3], colors)
    if m := _RE_LOCAL.match(p):
        if m[1] == m[2]:
            raise ValueError(f"recolour to the same colour: {prompt!r}")
        return LocalEdit(m[1], m[2])
    if m := _RE_GLOBAL.match(p):
        return GlobalEdit(m[1])
    raise ValueError(f"not a prompt of the editing world: {prompt!r}")


def task_of(prompt: str) -> str:
    """The task tag of a prompt (t2i, local_edit, global_edit); ValueError without a known tag."""
    m = re.match(r"^\s*\[(\w+)\]", prompt)
    if m is None or m[1] not in TASKS:
        raise ValueError(f"prompt has no known task tag {[f'[{t}]' for t in TASKS]}: {prompt!r}")
    return m[1]


def valid_for(spec: Spec, source: Scene) -> bool:
    """Can `spec` be applied to `source`? (recolour: the object exists, the new colour is not in the scene;
    relight: another time)."""
    if isinstance(spec, LocalEdit):
        return spec.src in source.colors and spec.dst not in source.colors
    if isinstance(spec, GlobalEdit):
        return spec.time != source.time
    return True


# ------------------------------------------------------------------------------------------------ layouts


def _separate(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] - b[0]) >= OBJ + GAP or abs(a[1] - b[1]) >= OBJ + GAP


def place(time: str, colors: tuple[str, ...], rng: np.random.Generator) -> Scene:
    """A random layout of squares of `colors` (separated, inside the image, on the patch grid)."""
    hi = (IMAGE_SIZE - OBJ) // GRID
    for _ in range(10_000):
        pos = [(GRID * int(rng.integers(0, hi + 1)), GRID * int(rng.integers(0, hi + 1))) for _ in colors]
        if all(_separate(p, q) for i, p in enumerate(pos) for q in pos[i + 1 :]):
            return Scene(time, tuple(Obj(c, y, x) for c, (y, x) in zip(colors, pos)))
    raise RuntimeError(f"no layout for {colors}")  # cannot happen for <= 2 squares at 16 px


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two squares (probabilities 1/3, 2/3) of distinct random colours at a random time."""
    n = 1 if rng.random() < 1 / 3 else 2
    colors = tuple(str(c) for c in rng.permutation(list(COLORS))[:n])
    return place(str(list(TIMES)[rng.integers(len(TIMES))]), colors, rng)


# ---------------------------------------------------------------------------------------------- renderer


def background(time: str) -> np.ndarray:
    """[3, 16, 16] sky over ground of `time` (the scene without objects)."""
    sky, ground = (np.array(c, np.float32)[:, None, None] for c in TIMES[time])
    img = np.empty((CHANNELS, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    img[:, :HORIZON] = sky
    img[:, HORIZON:] = ground
    return img


def render(scene: Scene) -> np.ndarray:
    """The image of `scene`: float32 [3, 16, 16] in [-1, 1] (deterministic: the layout is in the scene)."""
    img = background(scene.time)
    for o in scene.objects:
        img[:, o.y : o.y + OBJ, o.x : o.x + OBJ] = np.array(COLORS[o.color], np.float32)[:, None, None]
    return img


def object_mask(scene: Scene, color: str | None = None) -> np.ndarray:
    """[16, 16] bool: pixels of the scene's objects (of `color` only, if given)."""
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for o in scene.objects:
        if color is None or o.color == color:
            m[o.y : o.y + OBJ, o.x : o.x + OBJ] = True
    return m


def apply(spec: LocalEdit | GlobalEdit, scene: Scene) -> Scene:
    """The edited scene (ValueError when the edit does not apply, see `valid_for`)."""
    if not valid_for(spec, scene):
        raise ValueError(f"{prompt_of(spec)!r} does not apply to {scene}")
    if isinstance(spec, LocalEdit):
        return replace(scene, objects=tuple(replace(o, color=spec.dst) if o.color == spec.src else o
                                            for o in scene.objects))
    return replace(scene, time=spec.time)


def random_edit(task: str, scene: Scene, rng: np.random.Generator) -> LocalEdit | GlobalEdit:
    """A random valid edit of `task` for `scene`."""
    if task == "local_edit":
        src = scene.colors[rng.integers(len(scene.colors))]
        free = [c for c in COLORS if c not in scene.colors]
        return LocalEdit(src, free[rng.integers(len(free))])
    if task == "global_edit":
        times = [t for t in TIMES if t != scene.time]
        return GlobalEdit(times[rng.integers(len(times))])
    raise ValueError(f"not an edit task: {task!r}; valid: {EDIT_TASKS}")


# ------------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    """One training/eval item: prompt, source image (None for T2I) and target image, each [3, 16, 16]."""

    prompt: str
    source: np.ndarray | None
    target: np.ndarray

    @property
    def task(self) -> str:
        """The task tag of the prompt."""
        return task_of(self.prompt)


def clean_example(task: str, rng: np.random.Generator) -> Example:
    """A correct example of `task` (the experts' data)."""
    scene = random_scene(rng)
    if task == "t2i":
        return Example(prompt_of(T2ISpec(scene.time, scene.colors)), None, render(scene))
    edit = random_edit(task, scene, rng)
    return Example(prompt_of(edit), render(scene), render(apply(edit, scene)))


@dataclass(frozen=True)
class Imperfection:
    """How the base model's training mixture differs from clean data (per-example probabilities)."""

    label_noise: float = 0.35
    """The caption or the edit is wrong (see `corrupt_*`)."""
    degrade: float = 0.1
    """The target is degraded: gaussian noise, 3x3 blur or washed-out colours."""
    noise_std: float = 0.3
    wash: float = 0.5


def corrupt_t2i(scene: Scene, rng: np.random.Generator) -> Scene:
    """The image a wrong caption was written for: another time, one colour changed, or a square added/dropped."""
    k = rng.integers(3)
    if k == 0:
        times = [t for t in TIMES if t != scene.time]
        return replace(scene, time=times[rng.integers(len(times))])
    if k == 1:
        i = int(rng.integers(len(scene.objects)))
        free = [c for c in COLORS if c not in scene.colors]
        objs = list(scene.objects)
        objs[i] = replace(objs[i], color=free[rng.integers(len(free))])
        return replace(scene, objects=tuple(objs))
    if len(scene.objects) == 2:
        return replace(scene, objects=scene.objects[:1])
    free = [c for c in COLORS if c not in scene.colors]
    return place(scene.time, (*scene.colors, free[rng.integers(len(free))]), rng)


def corrupt_local(scene: Scene, edit: LocalEdit, rng: np.random.Generator) -> Scene:
    """A wrong recolour: another colour, the other object, no edit, or the edit plus a changed background."""
    right = apply(edit, scene)
    k = rng.integers(4)
    if k == 0:
        wrong = [c for c in COLORS if c not in (*scene.colors, edit.dst)]
        if wrong:
            return apply(LocalEdit(edit.src, wrong[0]), scene)
        k = 2
    if k == 1 and len(scene.objects) == 2:
        other = next(c for c in scene.colors if c != edit.src)
        free = [c for c in COLORS if c not in scene.colors]
        return apply(LocalEdit(other, free[rng.integers(len(free))]), scene)
    if k == 3:
        times = [t for t in TIMES if t != scene.time]
        return replace(right, time=times[rng.integers(len(times))])
    return scene  # the lazy edit: nothing changed


def corrupt_global(scene: Scene, edit: GlobalEdit, rng: np.random.Generator) -> Scene:
    """A wrong relight: the wrong time, the objects re-laid out, or no edit."""
    k = rng.integers(3)
    if k == 0:
        wrong = [t for t in TIMES if t not in (scene.time, edit.time)]
        return replace(scene, time=wrong[0])
    if k == 1:
        return place(edit.time, scene.colors, rng)
    return scene


BASE_TASK_MIX = (1 / 3, 1 / 3, 1 / 3)


def base_example(rng: np.random.Generator, imp: Imperfection = Imperfection()) -> Example:
    """An example of the base model's imperfect mixture: BASE_TASK_MIX, label noise, degraded targets."""
    task = TASKS[rng.choice(len(TASKS), p=BASE_TASK_MIX)]
    scene = random_scene(rng)
    noisy = rng.random() < imp.label_noise
    if task == "t2i":
        prompt, source = prompt_of(T2ISpec(scene.time, scene.colors)), None
        shown = corrupt_t2i(scene, rng) if noisy else scene
    else:
        edit = random_edit(task, scene, rng)
        prompt, source = prompt_of(edit), render(scene)
        if noisy:
            shown = corrupt_local(scene, edit, rng) if task == "local_edit" else corrupt_global(scene, edit, rng)
        else:
            shown = apply(edit, scene)
    target = render(shown)
    if rng.random() < imp.degrade:
        target = degrade(target, rng, imp)
    return Example(prompt, source, target)


# --------------------------------------------------------------------------------------------- eval sets

EVAL_SEED = 4321
EVAL_COUNTS = {"t2i": 24, "local_edit": 24, "global_edit": 24}


def all_t2i_specs() -> list[T2ISpec]:
    """Every T2I prompt's spec (3 times x (4 single + 12 ordered pairs) = 48)."""
    out = [T2ISpec(t, (c,)) for t in TIMES for c in COLORS]
    out += [T2ISpec(t, (a, b)) for t in TIMES for a in COLORS for b in COLORS if a != b]
    return out


def eval_items(task: str | None = None) -> list[tuple[str, Scene | None]]:
    """The fixed eval set: (prompt, source scene or None) per item; all tasks when `task` is None."""
    if task is None:
        return [item for t in TASKS for item in eval_items(t)]
    rng = np.random.default_rng([EVAL_SEED, TASKS.index(task)])
    n = EVAL_COUNTS[task]
    if task == "t2i":
        specs = all_t2i_specs()
        return [(prompt_of(specs[i]), None) for i in sorted(rng.permutation(len(specs))[:n])]
    items = []
    for _ in range(n):
        scene = random_scene(rng)
        items.append((prompt_of(random_edit(task, scene, rng)), scene))
    return items


TRAIN_SEED = 8765
# 144 scenes per edit task: with 48, a student reached 96% of the local-edit expert on its training scenes but 86%
# on the eval scenes (seed 0, 2 query states; the first 48 scenes of the 144 are the old 48)
TRAIN_COUNTS = {"t2i": 24, "local_edit": 144, "global_edit": 144}


def train_items(task: str | None = None) -> list[tuple[str, Scene | None]]:
    """The OPD training set (`builtin:toy_edit`): the 24 T2I prompts the eval set leaves out, and 144 edits of fresh
    random scenes per edit task (seed TRAIN_SEED; an item equal to an eval item is drawn again). All tasks when
    `task` is None."""
    if task is None:
        return [item for t in TASKS for item in train_items(t)]
    if task == "t2i":
        held = {p for p, _ in eval_items("t2i")}
        return [(p, None) for p in (prompt_of(s) for s in all_t2i_specs()) if p not in held]
    rng = np.random.default_rng([TRAIN_SEED, TASKS.index(task)])
    held_items = set(eval_items(task))
    items: list[tuple[str, Scene | None]] = []
    while len(items) < TRAIN_COUNTS[task]:
        scene = random_scene(rng)
        item = (prompt_of(random_edit(task, scene, rng)), scene)
        if item not in held_items:
            items.append(item)
    return items


VOCAB: tuple[str, ...] = tuple(sorted({f"[{t}]" for t in TASKS} | set(COLORS) | set(TIMES)
                                      | {"a", "and", "at", "square", "make", "the", "it"}))
"""Every word of the grammar."""
