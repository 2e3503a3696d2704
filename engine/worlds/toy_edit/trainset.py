"""The editing world's OPD training set as a DanceOPD prompt CSV with image files: what `builtin:toy_edit` reads.

    python -m engine.worlds.toy_edit.trainset            # (re)writes engine/worlds/toy_edit/weights/train/

`weights/train/train.csv` has DanceOPD's columns `task,prompt,source_image,target_image` (paths relative to the
CSV) and `images/` the 16x16 RGB PNGs: each edit row's source scene and its ground-truth edit (the target is only
checked: on-policy distillation needs none), so the world's data go through exactly the loader, preflight and image
cache a user's CSV does. PNGs are 8 bits a channel, so a decoded source is the rendered scene to within half a step
of 2/255 (the pixel encoder maps v to v / 127.5 - 1). `SHA256SUMS` covers every file; the world checks it before
handing the CSV out, and tests/test_toy_edit_opd.py regenerates the set and compares the decoded pixels.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.worlds.toy_edit.world import GlobalEdit, LocalEdit, apply, parse_prompt, render, task_of, train_items

TRAIN_DIR = Path(__file__).resolve().parent / "weights" / "train"
CSV_NAME = "train.csv"


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 (round((v + 1) * 127.5))."""
    return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def rows() -> list[tuple[str, str, np.ndarray | None, np.ndarray | None]]:
    """(task, prompt, source image or None, target image or None) of every training item, in file order."""
    out = []
    for prompt, scene in train_items():
        if scene is None:
            out.append((task_of(prompt), prompt, None, None))
            continue
        spec = parse_prompt(prompt)
        assert isinstance(spec, (LocalEdit, GlobalEdit))
        out.append((spec.task, prompt, render(scene), render(apply(spec, scene))))
    return out


def write(directory: Path = TRAIN_DIR) -> Path:
    """Write train.csv, images/*.png and SHA256SUMS into `directory`; returns the CSV's path."""
    from PIL import Image

    from engine.files import write_sha256sums

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    lines = []
    for task, prompt, source, target in rows():
        k = counts[task] = counts.get(task, 0) + 1
        names = ["", ""]
        for j, (kind, image) in enumerate((("source", source), ("target", target))):
            if image is not None:
                names[j] = f"images/{task}_{k:03d}_{kind}.png"
                Image.fromarray(to_uint8(image)).save(directory / names[j], optimize=False)
        lines.append((task, prompt, *names))
    path = directory / CSV_NAME
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["task", "prompt", "source_image", "target_image"])
        w.writerows(lines)
    write_sha256sums(directory, [CSV_NAME] + sorted(n for line in lines for n in line[2:] if n))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write the training set (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m engine.worlds.toy_edit.trainset", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(TRAIN_DIR))
    path = write(Path(ap.parse_args(argv).out))
    print(f"{path}: {sum(1 for _ in open(path)) - 1} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
