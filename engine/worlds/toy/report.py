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

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.worlds.toy.eval import EvalSettings, add_merge, field_velocity_fn, sample_with
from engine.worlds.toy.rewards import COLUMNS, score_row
from engine.worlds.toy.world import TASKS, eval_prompts

log = logging.getLogger("flowopd.report")

REWARDS_FILE = "rewards.jsonl"
QUICK_STRIDE = 2
"""The curve's quick subset: every other eval prompt (25 of 50) ..."""
QUICK_SAMPLES = 2
"""... with 2 samples each: 50 images, the same subset tests/test_toy_weights.py checks the shipped rows on."""
GRID_PROMPTS_PER_TASK = 2
OWN_TASK_FRACTION = 0.9
"""Target: the OPD student reaches >= 90% of each expert's reward on that expert's own task."""


def quick_prompts() -> list[str]:
    """The reward curves' quick subset of the eval prompts."""
    return eval_prompts()[::QUICK_STRIDE]


# -------------------------------------------------------------------------------------------- reward curve


class RewardCurve:
    """Trainer callback: every `report.eval_every` optimizer steps (and after the last), score the live student on
    the quick subset and append `{"step", compose, text, aesthetic, quality, average}` to `<run>/rewards.jsonl`.

    Runs on rank 0 only. The line of step s is written before the checkpoint of step s, so a resume never loses a
    point; a point written after the newest checkpoint is recomputed by the resumed run and the reader keeps the
    last line per step."""

    def __init__(self, config: Config):
        from engine.worlds.toy.encoder import ToyTextEncoder

        self.every = config.report.eval_every
        self.total = config.train.steps
        self.path = Path(config.output_dir) / REWARDS_FILE
        self.prompts = quick_prompts()
        self.encoder = ToyTextEncoder.from_pretrained()
        self.settings = EvalSettings(samples_per_prompt=QUICK_SAMPLES, steps=config.rollout.steps,
                                     shift=config.rollout.shift)

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based count of finished steps)."""
        return self.every > 0 and (step % self.every == 0 or step == self.total)

    def __call__(self, view: Any, step: int) -> None:
        """Score the live student after `step` finished steps when due (`view`: engine.trainer.TrainingView)."""
        if view.rank != 0 or not self.due(step):
            return
        with torch.no_grad():
            images = sample_with(view.student_velocity, self.encoder, self.prompts, self.settings, view.device)
        row = score_row(images, [p for p in self.prompts for _ in range(self.settings.samples_per_prompt)])
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
            f.flush()
        log.info("step %d rewards: %s", step, " ".join(f"{k} {v:.3f}" for k, v in row.items()))


def read_curve(path: Path) -> list[dict[str, float]]:
    """The curve's points by step (the last line of a step wins; a line torn by a kill is skipped)."""
    points: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                points[int(row["step"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return [points[s] for s in sorted(points)]


# --------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One row of the table: its cells, seed-0 samples and quick-subset values."""
    name: str
    kind: str
    """base, expert, merge or student."""
    cells: dict[str, dict[str, float]]
    """column -> {"mean", "std"} over the seeds."""
    run_dir: str = ""
    """Students: the run directory (its rewards.jsonl is the curve)."""
    images: torch.Tensor | None = field(default=None, repr=False)
    """Seed-0 samples, prompt-major (for the grid)."""
    quick: dict[str, float] = field(default_factory=dict)
    """Base and experts: the row on the curves' quick subset (their reference lines in rewards.png)."""

    def mean(self, column: str) -> float:
        """The mean over seeds of `column`."""
        return self.cells[column]["mean"]


def _teacher_tasks(config: Config) -> dict[str, list[str]]:
    """teacher name -> the tasks routed to a field of that teacher (its own tasks)."""
    source = {f.name: f.source for f in config.fields}
    out: dict[str, list[str]] = {t.name: [] for t in config.teachers}
    for task, field_name in config.opd.routes.items():
        teacher = source.get(field_name)
        if teacher in out and task in TASKS:
            out[teacher].append(task)
    return out


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
    cells = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
             for k in rows[0]}
    assert first is not None
    return cells, first


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
    names = [t.name for t in config.teachers]
    if names:
        ranks = {model.peft_config[n].r for n in names}
        if len(ranks) == 1:  # the reference averages A and B: at the teachers' common rank
            (r,) = ranks
            add("merge (average)", "merge", add_merge(model, "average", names, r, float(r), "_merge_average"))
        else:
            log.info("merge (average) row left out: the teachers' ranks %s differ", sorted(ranks))
        # the exact merge re-factored at the student's rank: the student's cold start when init.merge = svd
        s = config.student
        add("merge (SVD)", "merge", add_merge(model, "svd", names, s.rank, s.alpha, "_merge_svd"))
    for i, (name, run) in enumerate(runs):
        export = Path(run.output_dir) / "export"
        load_adapter(model, f"_student_{i}", export)
        add(name, "student", f"_student_{i}", run.output_dir)
    return rows


# ------------------------------------------------------------------------------------------------ targets


def check_targets(config: Config, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets, each {"target", "ok", "detail"}, from the measured rows (means over seeds)."""
    base = next(r for r in rows if r.kind == "base")
    experts = {r.name.removeprefix("expert: "): r for r in rows if r.kind == "expert"}
    merges = [r for r in rows if r.kind == "merge"]
    own = _teacher_tasks(config)
    out: list[dict[str, Any]] = []

    def check(target: str, ok: bool, detail: str) -> None:
        out.append({"target": target, "ok": bool(ok), "detail": detail})

    for name, row in experts.items():
        for task in own.get(name, []):
            check(f"expert {name} beats the base on {task}", row.mean(task) > base.mean(task),
                  f"{row.mean(task):.3f} vs {base.mean(task):.3f}")
        others = [c for c in TASKS if c not in own.get(name, [])]
        worse = [c for c in others if row.mean(c) < base.mean(c)]
        check(f"expert {name} is worse than the base on another task", bool(worse),
              ", ".join(f"{c} {row.mean(c):.3f} < {base.mean(c):.3f}" for c in worse) or "none")
    for s in (r for r in rows if r.kind == "student"):
        for ref in [*merges, *experts.values()]:
            check(f"{s.name}: average beats {ref.name}", s.mean("average") > ref.mean("average"),
                  f"{s.mean('average'):.3f} vs {ref.mean('average'):.3f}")
        for name, row in experts.items():
            for task in own.get(name, []):
                need = OWN_TASK_FRACTION * row.mean(task)
                check(f"{s.name}: >= 90% of expert {name} on {task}", s.mean(task) >= need,
                      f"{s.mean(task):.3f} vs {need:.3f} (= 0.9 x {row.mean(task):.3f})")
    return out


# ----------------------------------------------------------------------------------------------- writing


def _cell(v: dict[str, float], seeds: int) -> str:
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if seeds > 1 else f"{v['mean']:.3f}"


def table_markdown(rows: Sequence[Row], seeds: int) -> str:
    """The table as markdown (mean +- std cells with several seeds)."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r.name} | " + " | ".join(_cell(r.cells[c], seeds) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(config: Config, runs: Sequence[tuple[str, Config]], rows: Sequence[Row],
                    targets: Sequence[dict[str, Any]]) -> str:
    """report.md: the table, each student's settings, the target checks."""
    rep = config.report
    seeds = len(rep.seeds)
    met = sum(t["ok"] for t in targets)
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
    ]
    for name, run in runs:
        o, r = run.opd, run.rollout
        q = ("dense" if o.query_states == 0 else f"{o.query_states} ({o.query_bias})") + f" of {o.query_candidates}"
        anchor = f", anchor {o.anchor} (beta {o.beta:g})" if o.anchor and o.beta > 0 else ""
        lines.append(f"- {name}: loss {o.loss}, routing {o.routing}, {r.sampler} rollouts (cfg {r.cfg_scale:g}), "
                     f"query states {q}"
                     f"{anchor}, {run.train.steps} steps x {run.train.prompts_per_step * r.group_size} images, "
                     f"lr {run.train.lr:g}, init {run.init.merge}; run dir {run.output_dir}")
    lines += ["", f"Targets ({met}/{len(targets)} met):", ""]
    lines += [f"- [{'x' if t['ok'] else ' '}] {t['target']}: {t['detail']}" for t in targets]
    lines += ["", "Samples: samples.png (seed 0)."]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 2.8), squeeze=False)
    base = next(r for r in rows if r.kind == "base")
    experts = {r.name.removeprefix("expert: "): r for r in rows if r.kind == "expert" and r.quick}
    owner = {task: name for name, tasks in _teacher_tasks(config).items() for task in tasks}
    for ax, col in zip(axes[0], COLUMNS):
        if base.quick:
            ax.axhline(base.quick[col], color="gray", ls="--", lw=1, label="base")
        name = owner.get(col) or max(experts, key=lambda n: experts[n].quick[col], default=None)
        if name in experts:
            ax.axhline(experts[name].quick[col], color="black", ls=":", lw=1, label=f"expert {name}")
        for s in (r for r in rows if r.kind == "student"):
            pts = read_curve(Path(s.run_dir) / REWARDS_FILE)
            if pts:
                ax.plot([p["step"] for p in pts], [p[col] for p in pts], marker=".", label=s.name)
        ax.set_title(col)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1.03)  # an expert at 1.0 (text) stays visible
        ax.legend(fontsize=5, loc="lower right")
    axes[0][0].set_ylabel("reward (quick subset)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(config: Config, runs: Sequence[tuple[str, Config]]) -> str:
    """Measure every row (the students of `runs`: (row name, run config)) and write report.md/.json, samples.png
    and rewards.png; returns the markdown."""
    from engine.files import write_atomic

    out = Path(config.output_dir)
    rows = measure_rows(config, runs)
    targets = check_targets(config, rows)
    text = report_markdown(config, runs, rows, targets)
    data = {
        "columns": list(COLUMNS),
        "seeds": list(config.report.seeds),
        "samples_per_prompt": config.report.samples_per_prompt,
        "rows": {r.name: {"kind": r.kind, **r.cells} for r in rows},
        "curves": {r.name: read_curve(Path(r.run_dir) / REWARDS_FILE) for r in rows if r.kind == "student"},
        "targets": targets,
    }
    write_atomic(out / "report.json", json.dumps(data, indent=1, default=_json_default) + "\n")
    save_samples(out / "samples.png", rows, config.report.samples_per_prompt)
    if config.report.eval_every:
        save_curves(out / "rewards.png", config, rows)
    write_atomic(out / "report.md", text)
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")
