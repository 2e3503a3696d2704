"""The editing world's report: DanceOPD's table in small, the edits side by side, reward curves over steps.

    DIR/report.md     | model | t2i | local_edit | global_edit | preservation | average |  with rows base, each expert,
                      merge (average), merge (SVD), each guided field a student absorbs (sampled with its CFG), the
                      DanceOPD student and each `experiment.variants` student (e.g. the CFG-absorption student,
                      sampled unguided), then the issue's targets checked against the measured rows
    DIR/report.json   the same rows (mean and std over `report.seeds`) and the target checks
    DIR/samples.png   per eval item (2 of each task): the source image on top, then each model's output (seed 0)
    DIR/rewards.png   the students' quick-eval rewards over optimizer steps, base and experts as reference lines

Every row is measured the same way (engine.worlds.toy_edit.eval: the fixed eval items, fixed per-sample noise, the
deterministic Euler ODE over Z-Image's schedule, the source clean at every step) on a freshly loaded base; a row is
unguided unless it is a guided field's reference row. Columns (engine.worlds.toy_edit.rewards): t2i, local_edit and
global_edit are each capability's score (edit correctness x preservation), preservation the edit rows' mean
preserve term, average the mean of the four.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.worlds import report_common as common
from engine.worlds.report_common import Row, seed_cells
from engine.worlds.toy_edit.eval import EvalSettings, check_items, sample_items, sample_with
from engine.worlds.toy_edit.model import IMAGE_SIZE, activate, new_encoder
from engine.worlds.toy_edit.rewards import COLUMNS, score_row
from engine.worlds.toy_edit.world import TASKS, Scene, eval_items, render

log = logging.getLogger("flowopd.report")

QUICK_STRIDE = 2
"""The curves' quick subset: every other eval item of each task (36 of 72) ..."""
QUICK_SAMPLES = 2
"""... with 2 samples each: 72 images, ~5 s of one CPU core."""
GRID_ITEMS_PER_TASK = 2
CFG_ABSORPTION_FRACTION = 0.95
"""Target: the CFG-absorbed student sampled unguided is within 5% of the guided field on its capability."""


def quick_items() -> list[tuple[str, Scene | None]]:
    """The reward curves' quick subset of the eval items."""
    return check_items(QUICK_STRIDE)


class RewardCurve(common.RewardCurve):
    """`report_common.RewardCurve` on the quick subset, sampled with the live student's unguided velocity."""

    def __init__(self, config: Config):
        self.items = quick_items()
        self.encoder = new_encoder()
        self.settings = EvalSettings(samples_per_item=QUICK_SAMPLES, steps=config.rollout.steps,
                                     shift=config.rollout.shift)
        super().__init__(config, self._score)

    def _score(self, view: Any) -> dict[str, float]:
        images, prompts, sources = sample_with(view.student_velocity, self.encoder, self.items, self.settings,
                                               view.device)
        return score_row(images, prompts, sources)


# --------------------------------------------------------------------------------------------------- rows


def guided_fields(run: Config) -> list[tuple[str, str | None, float]]:
    """(field name, adapter or None for the base, CFG scale) of every guided field of `run`."""
    return [(f.name, None if f.source == "base" else f.source, f.cfg_scale) for f in run.fields if f.cfg_scale != 1.0]


def absorbs_cfg(run: Config) -> bool:
    """The run distils a guided field into an unguided student (DanceOPD's CFG absorption)."""
    return bool(guided_fields(run)) and run.rollout.cfg_scale == 1.0 and run.opd.student_cfg == 1.0


def field_row_name(name: str, scale: float) -> str:
    """The table name of a guided field's reference row."""
    return f"field: {name} (CFG {scale:g})"


def _load_world(config: Config) -> torch.nn.Module:
    """A fresh frozen base with every teacher loaded (no training state involved)."""
    from engine.adapters.lora import load_teachers
    from engine.backends.zimage.backend import ZImageBackend

    model, _ = ZImageBackend().load(resolve_path(config.model.path), torch.float32,
                                    latent_size=config.model.latent_size or IMAGE_SIZE)
    load_teachers(model, config.teachers, config.student.targets)
    model.eval().requires_grad_(False)
    return model


def _measure(model: torch.nn.Module, adapter: str | None, settings: EvalSettings, seeds: Sequence[int],
             items: Sequence[tuple[str, Scene | None]]) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    encoder, rows, first = new_encoder(), [], None
    activate(model, adapter)
    try:
        for s in seeds:
            images, prompts, sources = sample_items(model, encoder, items, replace(settings, seed=s))
            rows.append(score_row(images, prompts, sources))
            first = images if first is None else first
    finally:
        activate(model, None)
    assert first is not None
    return seed_cells(rows), first


def measure_rows(config: Config, runs: Sequence[tuple[str, Config]]) -> list[Row]:
    """Every row of the table, measured now (rank 0, after all runs are exported)."""
    from engine.adapters.lora import load_adapter

    rep = config.report
    model = _load_world(config)
    settings = EvalSettings(samples_per_item=rep.samples_per_prompt, steps=config.rollout.steps,
                            shift=config.rollout.shift)
    items = eval_items()
    rows: list[Row] = []

    def add(name: str, kind: str, adapter: str | None, run_dir: str = "", cfg: float = 1.0) -> None:
        cells, images = _measure(model, adapter, replace(settings, cfg=cfg), rep.seeds, items)
        rows.append(Row(name, kind, cells, run_dir, images))
        if kind in ("base", "expert") and rep.eval_every:
            quick = replace(settings, samples_per_item=QUICK_SAMPLES)
            rows[-1].quick = {k: v["mean"] for k, v in _measure(model, adapter, quick, [0], quick_items())[0].items()}
        log.info("%s: %s", name, " ".join(f"{k} {v['mean']:.3f}" for k, v in cells.items()))

    add("base", "base", None)
    for t in config.teachers:
        add(f"expert: {t.name}", "expert", t.name)
    common.add_merge_rows(model, config, add, config.student.targets)
    seen = set()
    for _, run in runs:
        for name, adapter, scale in guided_fields(run) if absorbs_cfg(run) else []:
            if (adapter, scale) not in seen:
                seen.add((adapter, scale))
                add(field_row_name(name, scale), "field", adapter, cfg=scale)
    for i, (name, run) in enumerate(runs):
        load_adapter(model, f"_student_{i}", Path(run.output_dir) / "export")
        add(name, "student", f"_student_{i}", run.output_dir)
    return rows


# ------------------------------------------------------------------------------------------------ targets


def check_targets(config: Config, runs: Sequence[tuple[str, Config]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets from the measured rows (means over seeds): the common ones (experts conflict; the
    DanceOPD student's average beats both merges and every expert, >= 90% of each expert on its capability) for
    every student that does not absorb CFG, and for a CFG-absorption student: sampled unguided, within 5% of each
    guided field on the capability routed to that field."""
    absorbing = {name: run for name, run in runs if absorbs_cfg(run)}
    out = common.check_targets(config, [r for r in rows if r.name not in absorbing], TASKS)
    by_name = {r.name: r for r in rows}
    for name, run in absorbing.items():
        student = by_name[name]
        for field_name, _, scale in guided_fields(run):
            ref = by_name[field_row_name(field_name, scale)]
            for task in (t for t, f in run.opd.routes.items() if f == field_name and t in TASKS):
                need = CFG_ABSORPTION_FRACTION * ref.mean(task)
                out.append({"target": f"{name}: unguided within 5% of {ref.name} on {task}",
                            "ok": bool(student.mean(task) >= need),
                            "detail": f"{student.mean(task):.3f} vs {need:.3f} (= 0.95 x {ref.mean(task):.3f})"})
    return out


# ----------------------------------------------------------------------------------------------- writing


def report_markdown(config: Config, runs: Sequence[tuple[str, Config]], rows: Sequence[Row],
                    targets: Sequence[dict[str, Any]]) -> str:
    """report.md: the table, each student's settings, the target checks."""
    rep = config.report
    seeds = len(rep.seeds)
    lines = [
        "# flowopd: the editing miniature world (DanceOPD on Z-Image)",
        "",
        f"Eval: {len(eval_items())} fixed items (T2I prompts and edits of fixed source scenes) x "
        f"{rep.samples_per_prompt} samples, Euler ODE {config.rollout.steps} steps over Z-Image's schedule (shift "
        f"{config.rollout.shift:g}), the source clean at every step; unguided except the `field:` rows; noise seeds "
        f"{list(rep.seeds)}" + (" (mean ± std over seeds)" if seeds > 1 else "") + ". Rewards in [0, 1]: "
        "local/global edit = correctness x preservation, preservation = the edits' preserve terms, average = mean "
        "of the four.",
        "",
        common.table_markdown(rows, seeds, COLUMNS),
        "",
        "Students:",
        *common.student_lines(runs),
        "",
        *common.target_lines(targets),
        "",
        "Samples: samples.png (seed 0: each item's source on top, then every model's output).",
    ]
    if rep.eval_every:
        lines[-1] += (f" Reward curves: rewards.png (every {rep.eval_every} steps on the quick subset: every other "
                      f"eval item, {QUICK_SAMPLES} samples each, seed 0).")
    return "\n".join(lines) + "\n"


def _grid_items(samples: int) -> tuple[list[int], list[tuple[str, Scene | None]]]:
    """Image indices (sample 0 of each) and items of the grid: the first GRID_ITEMS_PER_TASK items of each task."""
    items = eval_items()
    picked = []
    for task in TASKS:
        picked += [i for i, (p, _) in enumerate(items) if p.startswith(f"[{task}]")][:GRID_ITEMS_PER_TASK]
    return [i * samples for i in picked], [items[i] for i in picked]


def save_samples(path: Path, rows: Sequence[Row], samples: int) -> None:
    """samples.png: the sources on top, then one row of seed-0 outputs per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx, items = _grid_items(samples)
    blank = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 1.0)
    sources = [blank if s is None else torch.from_numpy(render(s)) for _, s in items]
    grid = [("source", sources)] + [(r.name, [r.images[i] for i in idx]) for r in rows if r.images is not None]
    fig, axes = plt.subplots(len(grid), len(idx), figsize=(1.3 * len(idx) + 2.2, 1.3 * len(grid)), squeeze=False)
    for r, (name, images) in enumerate(grid):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(((image.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(items[c][0].replace("] ", "]\n"), fontsize=5)
            if c == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_report(config: Config, runs: Sequence[tuple[str, Config]]) -> str:
    """Measure every row (the students of `runs`: (row name, run config)) and write report.md/.json, samples.png
    and rewards.png; returns the markdown."""
    from engine.files import write_atomic

    out = Path(config.output_dir)
    rows = measure_rows(config, runs)
    targets = check_targets(config, runs, rows)
    text = report_markdown(config, runs, rows, targets)
    write_atomic(out / "report.json", common.report_json(config, rows, targets, COLUMNS))
    save_samples(out / "samples.png", rows, config.report.samples_per_prompt)
    if config.report.eval_every:
        common.save_curves(out / "rewards.png", config, rows, COLUMNS, TASKS)
    write_atomic(out / "report.md", text)
    return text
