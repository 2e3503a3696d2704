"""Prompt rows with source images (editing data) and their checks before any work.

The rows come from DanceOPD's CSV or from jsonl (engine/data/prompts.py reads both, image paths relative to the
prompt file's directory as DanceOPD resolves them). A row with a `source_image` is an edit row: its conditioning
carries that image (engine/data/images.py caches the image's tensors once). A task is an edit task when any of its
rows has a source image, and then every row of it needs one. `target_image` is checked only (DanceOPD uses it for
its off-policy ablation; on-policy distillation needs no target).

`edit_problems` is the preflight of these rows: every source/target file exists and opens as an image, edit tasks
have a source on every row, and the model family accepts each source's size. Each problem names the prompt file and
line, and all are reported at once before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from engine.data.prompts import Prompt

MAX_LISTED = 20  # problems listed per kind; the rest are counted (a 10k-row CSV with a wrong image root)


def image_size(file: str) -> tuple[tuple[int, int] | None, str]:
    """((width, height), "") of an image file PIL can read and verify, else (None, why)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(file).is_file():
        return None, "file not found"
    try:
        with Image.open(file) as im:
            size = im.size
            im.verify()  # reads the whole file (PNG: every chunk's CRC) without decoding the pixels
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return None, f"PIL cannot read it as an image ({exc})"
    return size, ""


def edit_problems(prompts: Sequence[Prompt], size_problem: Callable[[tuple[int, int]], str]) -> list[str]:
    """Every problem of the rows' images, each naming `file:line`: a missing or unreadable source/target image, an
    edit task's row without a source image, a source the model family refuses (`size_problem(size)` says why, ""
    if it is fine). Listed per kind up to MAX_LISTED, then counted."""
    by_kind: dict[str, list[str]] = {}

    def add(kind: str, text: str) -> None:
        by_kind.setdefault(kind, []).append(text)

    first_edit: dict[str, str] = {}
    for p in prompts:
        if p.source and p.task not in first_edit:
            first_edit[p.task] = p.where
    checked: dict[str, tuple[tuple[int, int] | None, str]] = {}
    for p in prompts:
        where = p.where or "(prompt set)"
        if p.task in first_edit and not p.source:
            add("no source", f"{where}: task {p.task!r} is an edit task (rows with a source_image, e.g. "
                             f"{first_edit[p.task]}) but this row has no source_image")
        for column, file in (("source_image", p.source), ("target_image", p.target)):
            if not file:
                continue
            if file not in checked:
                checked[file] = image_size(file)
            size, why = checked[file]
            if size is None:
                add(f"{column} unreadable", f"{where}: {column} {file}: {why}")
            elif column == "source_image" and (refused := size_problem(size)):
                add("source refused", f"{where}: source_image {file}: {refused}")
    out: list[str] = []
    for items in by_kind.values():
        out += items[:MAX_LISTED]
        if len(items) > MAX_LISTED:
            out.append(f"... and {len(items) - MAX_LISTED} more like the above")
    return out


def has_sources(prompts: Sequence[Prompt]) -> bool:
    """Whether any row is an edit row."""
    return any(p.source for p in prompts)
