"""What the miniature worlds' reports share: table rows, mean ± std cells, the issues' targets, merges of the
experts, reward curves (the step callback and its file), the markdown table, the curve plot and report.json.

A world's own report module (engine/worlds/<world>/report.py) decides how a row is measured (its eval set, its
sampler, its rewards) and what its sample grid shows; everything that only needs the measured numbers is here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config.schema import Config

log = logging.getLogger("flowopd.report")

REWARDS_FILE = "rewards.jsonl"
OWN_TASK_FRACTION = 0.9
"""Target: the OPD student reaches >= 90% of each expert's reward on that expert's own task."""


@dataclass
class Row:
    """One row of the table: its cells, seed-0 samples and quick-subset values."""
    name: str
    kind: str
    """base, expert, merge, field (a guided field as a reference), student or extra (`report.rows`)."""
    cells: dict[str, dict[str, float]]
    """column -> {"mean", "std"} over the seeds."""
    run_dir: str = ""
    """Students: the run directory (its rewards.jsonl is the curve)."""
    images: torch.Tensor | None = field(default=None, repr=False)
    """Seed-0 samples, item-major (for the grid)."""
    quick: dict[str, float] = field(default_factory=dict)
    """Base and experts: the row on the curves' quick subset (their reference lines in rewards.png)."""

    def mean(self, column: str) -> float:
        """The mean over seeds of `column`."""
        return self.cells[column]["mean"]


def seed_cells(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{column: {"mean", "std"}} of per-seed rows (population std)."""
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]}


def add_merge(model: torch.nn.Module, method: str, experts: Sequence[str], rank: int, alpha: float,
              name: str, targets: Sequence[str] | None = None) -> str:
    """A `name` adapter (rank, alpha; on `targets`, default the LoraSpec default) holding the `method` merge of
    `experts`; returns its name."""
    from engine.adapters.lora import LoraSpec, adapter_names, add_adapter
    from engine.adapters.merge import merge_into_student

    if name in adapter_names(model):
        model.delete_adapters(name)
    spec = LoraSpec(rank=rank, alpha=alpha) if targets is None else LoraSpec(rank, alpha, tuple(targets))
    add_adapter(model, name, spec)
    merge_into_student(model, list(experts), method=method, student=name)
    return name


def add_merge_rows(model: torch.nn.Module, config: Config, add: Callable[[str, str, str | None], None],
                   targets: Sequence[str] | None = None) -> None:
    """The two merge rows of the teachers: `merge (average)` at their common rank (left out, with a log line,
    when the ranks differ: the reference averages A and B) and `merge (SVD)` at the student's rank (the student's
    cold start when init.merge = svd); `add(name, kind, adapter)` measures one."""
    names = [t.name for t in config.teachers]
    if not names:
        return
    ranks = {model.peft_config[n].r for n in names}
    if len(ranks) == 1:
        (r,) = ranks
        add("merge (average)", "merge", add_merge(model, "average", names, r, float(r), "_merge_average", targets))
    else:
        log.info("merge (average) row left out: the teachers' ranks %s differ", sorted(ranks))
    s = config.student
    add("merge (SVD)", "merge", add_merge(model, "svd", names, s.rank, s.alpha, "_merge_svd", targets))


def teacher_tasks(config: Config, tasks: Sequence[str]) -> dict[str, list[str]]:
    """teacher name -> the tasks (of `tasks`) routed to a field of that teacher (its own tasks)."""
    source = {f.name: f.source for f in config.fields}
    out: dict[str, list[str]] = {t.name: [] for t in config.teachers}
    for task, field_name in config.opd.routes.items():
        teacher = source.get(field_name)
        if teacher in out and task in tasks:
            out[teacher].append(task)
    return out


def check_targets(config: Config, rows: Sequence[Row], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """The issues' common targets, each {"target", "ok", "detail"}, from the measured rows (means over seeds):
    every expert beats the base on its own task(s) and is worse than the base on another; every student's average
    beats both merges and every expert's; every student reaches >= 90% of each expert on that expert's tasks."""
    base = next(r for r in rows if r.kind == "base")
    experts = {r.name.removeprefix("expert: "): r for r in rows if r.kind == "expert"}
    merges = [r for r in rows if r.kind == "merge"]
    own = teacher_tasks(config, tasks)
    out: list[dict[str, Any]] = []

    def check(target: str, ok: bool, detail: str) -> None:
        out.append({"target": target, "ok": bool(ok), "detail": detail})

    for name, row in experts.items():
        for task in own.get(name, []):
            check(f"expert {name} beats the base on {task}", row.mean(task) > base.mean(task),
                  f"{row.mean(task):.3f} vs {base.mean(task):.3f}")
        others = [c for c in tasks if c not in own.get(name, [])]
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


def cell(v: Mapping[str, float], seeds: int) -> str:
    """`mean ± std` with several seeds, else `mean` (3 decimals)."""
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if seeds > 1 else f"{v['mean']:.3f}"


def table_markdown(rows: Sequence[Row], seeds: int, columns: Sequence[str]) -> str:
    """The table as markdown (mean +- std cells with several seeds)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {r.name} | " + " | ".join(cell(r.cells[c], seeds) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def student_lines(runs: Sequence[tuple[str, Config]]) -> list[str]:
    """One line per student: its loss, rollouts, query states, anchor, steps, lr, EMA, cold start and run dir."""
    lines = []
    for name, run in runs:
        o, r = run.opd, run.rollout
        q = ("dense" if o.query_states == 0 else f"{o.query_states} ({o.query_bias})") + f" of {o.query_candidates}"
        anchor = f", anchor {o.anchor} (beta {o.beta:g})" if o.anchor and o.beta > 0 else ""
        guided = [f"{f.name} {f.cfg_scale:g}" for f in run.fields if f.cfg_scale != 1.0]
        fields = f", guided fields {', '.join(guided)}" if guided else ""
        t = run.train
        ema = f", EMA {t.ema_decay:g} every {t.ema_every}" if t.ema_decay > 0 else ""
        lines.append(f"- {name}: loss {o.loss}, {r.sampler} rollouts (cfg {r.cfg_scale:g}), {o.routing} routing, "
                     f"query states {q}{anchor}{fields}, {t.steps} steps x "
                     f"{t.prompts_per_step * r.group_size * t.grad_accum} images, lr {t.lr:g}{ema}, "
                     f"rank {run.student.rank}, init {run.init.merge}; run dir {run.output_dir}")
    return lines


def target_lines(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """`Targets (met/all met):` and one checkbox line per target."""
    met = sum(t["ok"] for t in targets)
    return [f"Targets ({met}/{len(targets)} met):", ""] + [
        f"- [{'x' if t['ok'] else ' '}] {t['target']}: {t['detail']}" for t in targets]


# -------------------------------------------------------------------------------------------- reward curves


class RewardCurve:
    """Trainer callback: every `report.eval_every` optimizer steps (and after the last), score the live student with
    `score(view)` (a world's quick subset: column -> value) and append `{"step", **row}` to `<run>/rewards.jsonl`.

    Runs on rank 0 only. The line of step s is written before the checkpoint of step s, so a resume never loses a
    point; a point written after the newest checkpoint is recomputed by the resumed run and the reader keeps the
    last line per step."""

    def __init__(self, config: Config, score: Callable[[Any], dict[str, float]]):
        self.every = config.report.eval_every
        self.total = config.train.steps
        self.path = Path(config.output_dir) / REWARDS_FILE
        self.score = score

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based count of finished steps)."""
        return self.every > 0 and (step % self.every == 0 or step == self.total)

    def __call__(self, view: Any, step: int) -> None:
        """Score the live student after `step` finished steps when due (`view`: engine.trainer.TrainingView)."""
        if view.rank != 0 or not self.due(step):
            return
        with torch.no_grad():
            row = self.score(view)
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


def save_curves(path: Path, config: Config, rows: Sequence[Row], columns: Sequence[str],
                tasks: Sequence[str]) -> None:
    """One panel per column: each student's curve; the base and the column's expert (for other columns, the best
    expert) as reference lines measured on the same quick subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8), squeeze=False)
    base = next(r for r in rows if r.kind == "base")
    experts = {r.name.removeprefix("expert: "): r for r in rows if r.kind == "expert" and r.quick}
    owner = {task: name for name, ts in teacher_tasks(config, tasks).items() for task in ts}
    for ax, col in zip(axes[0], columns):
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
        ax.set_ylim(0, 1.03)  # an expert at 1.0 (text, relighting) stays visible
        ax.legend(fontsize=5, loc="lower right")
    axes[0][0].set_ylabel("reward (quick subset)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_json(config: Config, rows: Sequence[Row], targets: Sequence[Mapping[str, Any]], columns: Sequence[str],
                **extra: Any) -> str:
    """report.json: columns, seeds, every row's cells, the students' curves, the targets (and `extra` keys)."""
    data = {
        "columns": list(columns),
        "seeds": list(config.report.seeds),
        "samples_per_prompt": config.report.samples_per_prompt,
        "rows": {r.name: {"kind": r.kind, **r.cells} for r in rows},
        "curves": {r.name: read_curve(Path(r.run_dir) / REWARDS_FILE) for r in rows if r.kind == "student"},
        "targets": list(targets),
        **extra,
    }
    return json.dumps(data, indent=1, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")
