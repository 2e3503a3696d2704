"""The miniature world's report: the paper's table in small, a sample grid per row, reward curves over steps.

    DIR/report.md     | model | compose | text | aesthetic | quality | average |  with rows base, each expert
                      (teacher), merge (average), merge (SVD), the OPD student and each `experiment.variants` student,
                      then the issue's targets checked against the measured rows
    DIR/report.json   the same rows (mean and std over `report.seeds`) and the target checks
    DIR/samples.png   one row of samples per model (2 eval prompts per task, seed 0)
    DIR/rewards.png   the students' quick-eval rewards over optimizer steps (`rewards.jsonl` of each run), with the
                      base and each task's expert as reference lines

Every row is measured the same way (engine.worlds.toy.eval: fixed eval prompts, fixed per-sample noise,
deterministic Euler ODE, unguided) on a freshly loaded base, so the table does not depend on the state training
left the model in.
The curve points come from `RewardCurve`, a trainer callback that scores the live student on the quick subset
(every other eval prompt, 2 samples each: 50 images, ~2 s of one CPU core).
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
from engine.worlds.report_common import REWARDS_FILE, Row, read_curve, seed_cells
from engine.worlds.toy.eval import EvalSettings, field_velocity_fn, sample_with
from engine.worlds.toy.rewards import COLUMNS, score_row
from engine.worlds.toy.world import TASKS, eval_prompts

log = logging.getLogger("flowopd.report")

__all__ = ["REWARDS_FILE", "RewardCurve", "Row", "check_targets", "measure_rows", "read_curve", "write_report"]

QUICK_STRIDE = 2
"""The curve's quick subset: every other eval prompt (25 of 50) ..."""
QUICK_SAMPLES = 2
"""... with 2 samples each: 50 images, the same subset tests/test_toy_weights.py checks the shipped rows on."""
GRID_PROMPTS_PER_TASK = 2


def quick_prompts() -> list[str]:
    """The reward curves' quick subset of the eval prompts."""
    return eval_prompts()[::QUICK_STRIDE]


# -------------------------------------------------------------------------------------------- reward curve


class RewardCurve(common.RewardCurve):
    """`report_common.RewardCurve` on the quick subset: every other eval prompt, 2 samples each (50 images, ~2 s
    of one CPU core); the row is {compose, text, aesthetic, quality, average}."""

    def __init__(self, config: Config):
        from engine.worlds.toy.encoder import ToyTextEncoder

        self.prompts = quick_prompts()
        self.encoder = ToyTextEncoder.from_pretrained()
        self.settings = EvalSettings(samples_per_prompt=QUICK_SAMPLES, steps=config.rollout.steps,
                                     shift=config.rollout.shift)
        super().__init__(config, self._score)

    def _score(self, view: Any) -> dict[str, float]:
        images = sample_with(view.student_velocity, self.encoder, self.prompts, self.settings, view.device)
        return score_row(images, [p for p in self.prompts for _ in range(self.settings.samples_per_prompt)])


# --------------------------------------------------------------------------------------------------- rows


def _load_world(config: Config) -> tuple[torch.nn.Module, Any]:
    """A fresh frozen base with every teacher loaded, and the toy encoder (no training state involved)."""
    from engine.adapters.lora import load_teachers
    from engine.backends.sd3.loading import load_transformer
    from engine.worlds.toy.encoder import ToyTextEncoder

    model = load_transformer(resolve_path(config.model.path), torch.float32).eval()
    load_teachers(model, config.teachers, config.student.targets)
    model.requires_grad_(False)
    return model, ToyTextEncoder.from_pretrained()


def _measure(model: torch.nn.Module, encoder: Any, adapter: str | None, settings: EvalSettings,
             seeds: Sequence[int], prompts: Sequence[str]) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    rows, first = [], None
    per_image = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    device = next(model.parameters()).device
    velocity = field_velocity_fn(model, adapter, encoder.encode([""]).to(device), settings.cfg)
    for s in seeds:
        images = sample_with(velocity, encoder, prompts, replace(settings, seed=s), device)
        rows.append(score_row(images, per_image))
        first = images if first is None else first
    assert first is not None
    return seed_cells(rows), first


def measure_rows(config: Config, runs: Sequence[tuple[str, Config]]) -> list[Row]:
    """Every row of the table, measured now (rank 0, after all runs are exported)."""
    from engine.adapters.lora import load_adapter

    rep = config.report
    model, encoder = _load_world(config)
    settings = EvalSettings(samples_per_prompt=rep.samples_per_prompt, steps=config.rollout.steps,
                            shift=config.rollout.shift)
    prompts = eval_prompts()
    rows: list[Row] = []

    quick = replace(settings, samples_per_prompt=QUICK_SAMPLES)

    def add(name: str, kind: str, adapter: str | None, run_dir: str = "") -> None:
        cells, images = _measure(model, encoder, adapter, settings, rep.seeds, prompts)
        rows.append(Row(name, kind, cells, run_dir, images))
        if kind in ("base", "expert") and rep.eval_every:
            rows[-1].quick = {k: v["mean"] for k, v in _measure(model, encoder, adapter, quick, [0],
                                                                 quick_prompts())[0].items()}
        log.info("%s: %s", name, " ".join(f"{k} {v['mean']:.3f}" for k, v in cells.items()))

    add("base", "base", None)
    for t in config.teachers:
        add(f"expert: {t.name}", "expert", t.name)
    common.add_merge_rows(model, config, add)
    for i, (name, run) in enumerate(runs):
        export = Path(run.output_dir) / "export"
        load_adapter(model, f"_student_{i}", export)
        add(name, "student", f"_student_{i}", run.output_dir)
    for i, (name, path) in enumerate(rep.rows.items()):  # `report.rows`: any other adapter, beside the targets
        load_adapter(model, f"_row_{i}", resolve_path(path))
        add(name, "extra", f"_row_{i}")
    return rows


# ------------------------------------------------------------------------------------------------ targets


def check_targets(config: Config, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets, each {"target", "ok", "detail"}, from the measured rows (means over seeds)."""
    return common.check_targets(config, rows, TASKS)


# ----------------------------------------------------------------------------------------------- writing


def table_markdown(rows: Sequence[Row], seeds: int) -> str:
    """The table as markdown (mean +- std cells with several seeds)."""
    return common.table_markdown(rows, seeds, COLUMNS)


def report_markdown(config: Config, runs: Sequence[tuple[str, Config]], rows: Sequence[Row],
                    targets: Sequence[dict[str, Any]]) -> str:
    """report.md: the table, each student's settings, the target checks."""
    rep = config.report
    seeds = len(rep.seeds)
    lines = [
        "# flowopd: the miniature world",
        "",
        f"Eval: {len(eval_prompts())} fixed prompts x {rep.samples_per_prompt} samples, Euler ODE "
        f"{config.rollout.steps} steps (shift {config.rollout.shift:g}), unguided; noise seeds {list(rep.seeds)}"
        + (" (mean ± std over seeds)" if seeds > 1 else "") + ". Rewards in [0, 1]; average = mean of the "
        "task columns and quality.",
        "",
        table_markdown(rows, seeds),
        "",
        "Students:",
        *common.student_lines(runs),
        "",
        *common.target_lines(targets),
        "",
        "Samples: samples.png (seed 0).",
    ]
    if rep.eval_every:
        lines[-1] += (f" Reward curves: rewards.png (every {rep.eval_every} steps on the quick subset: every other "
                      f"eval prompt, {QUICK_SAMPLES} samples each, seed 0).")
    return "\n".join(lines) + "\n"


def _grid_indices(prompts: Sequence[str], samples: int) -> tuple[list[int], list[str]]:
    from engine.worlds.toy.world import task_of

    picked: list[int] = []
    for task in TASKS:
        picked += [i for i, p in enumerate(prompts) if task_of(p) == task][:GRID_PROMPTS_PER_TASK]
    return [i * samples for i in picked], [prompts[i] for i in picked]


def save_samples(path: Path, rows: Sequence[Row], samples_per_prompt: int) -> None:
    """samples.png: one row of seed-0 samples per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx, prompts = _grid_indices(eval_prompts(), samples_per_prompt)
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 * len(idx) + 1.6, 1.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        assert row.images is not None
        for c, i in enumerate(idx):
            ax = axes[r][c]
            ax.imshow(((row.images[i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c].replace("] ", "]\n"), fontsize=5)
            if c == 0:
                ax.set_ylabel(row.name, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def save_curves(path: Path, config: Config, rows: Sequence[Row]) -> None:
    """One panel per column: each student's curve; the base and the column's expert (for quality and the average,
    the best expert) as reference lines measured on the same quick subset."""
    common.save_curves(path, config, rows, COLUMNS, TASKS)


def write_report(config: Config, runs: Sequence[tuple[str, Config]]) -> str:
    """Measure every row (the students of `runs`: (row name, run config)) and write report.md/.json, samples.png
    and rewards.png; returns the markdown."""
    from engine.files import write_atomic

    out = Path(config.output_dir)
    rows = measure_rows(config, runs)
    targets = check_targets(config, rows)
    text = report_markdown(config, runs, rows, targets)
    write_atomic(out / "report.json", common.report_json(config, rows, targets, COLUMNS))
    save_samples(out / "samples.png", rows, config.report.samples_per_prompt)
    if config.report.eval_every:
        save_curves(out / "rewards.png", config, rows)
    write_atomic(out / "report.md", text)
    return text
