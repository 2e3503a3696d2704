"""The ablation table of the miniature world (docs/ablations.md): one student per row and training seed, each
row's rewards as mean ± std over the training seeds, measured with the report's own code.

    nice -n 10 python scripts/ablations.py                     # every row x seeds 0 1 2 in out/ablations/
    python scripts/ablations.py --rows gkd kl_only --seeds 0   # a subset
    python scripts/ablations.py --steps-scale 0.5              # shorter students (say so next to the table)
    python scripts/ablations.py --table-only --write-docs      # re-measure finished runs, update docs/ablations.md

Each run is `engine/train.py --config configs/toy.toml` with the row's `--set` overrides, `train.seed = N`, no
report and no variants of its own, in `<out>/<row>/seed_<N>` (resumable: a finished run is not re-run). Rows run
in `--jobs` child processes side by side with one thread each (the toy model scales poorly across threads:
engine/experiment.py). The table is then measured in this process by `engine.worlds.toy.report.measure_rows` on a
fresh base (the same eval as the README's table: 50 held-out prompts x 4 samples, 10-step Euler ODE, eval noise
seed 0), so a row differs from the README's students only by its overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "toy.toml"
DANCE = ["opd.loss=mse", "rollout.sampler=ode", "opd.routing=step", "opd.query_states=1", "opd.query_bias=low",
         "opd.query_candidates=all", "opd.beta=0.0", "opd.anchor=''", "train.steps=150"]
"""The DanceOPD variant of configs/toy.toml (the README's DanceOPD student): the base of the routing, query and
state-source rows."""
FLOW_STEPS, DANCE_STEPS = 100, 150


@dataclass(frozen=True)
class Ablation:
    """One row: its group, name and `--set` overrides on configs/toy.toml."""

    group: str
    name: str
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The row's directory name."""
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")


ROWS: list[Ablation] = [
    # losses, in the Flow-OPD student's setting (SDE rollouts, routing by task, 2 uniform training states, MAR anchor)
    Ablation("loss", "gkd (Flow-OPD transition KL)", ()),
    Ablation("loss", "kl_only (Flow-OPD code: A attached)", ("opd.loss=kl_only",)),
    Ablation("loss", "kl_only detached (zero-mean ablation)", ("opd.loss=kl_only", "opd.advantage_grad=false")),
    Ablation("loss", "rkl_pg (reverse-KL policy gradient)", ("opd.loss=rkl_pg",)),
    Ablation("loss", "rkl_pg + pathwise (w = 1)", ("opd.loss=rkl_pg", "opd.rkl_pathwise=1.0")),
    Ablation("loss", "mse (velocity MSE)", ("opd.loss=mse",)),
    # routing, in the DanceOPD student's setting (ODE, velocity MSE, one Beta(5,2) state over all T states)
    Ablation("routing", "G=1 per step (DanceOPD)", tuple(DANCE)),
    Ablation("routing", "per sample (task)", (*DANCE, "opd.routing=task")),
    Ablation("routing", "per epoch (Flow-OPD alternate, 5 steps)", (*DANCE, "opd.routing=epoch", "opd.epoch_steps=5")),
    Ablation("routing", "soft (equal mix of the 3 experts)",
             (*DANCE, "opd.routing=soft", "opd.weights={compose=1.0, text=1.0, aesthetic=1.0}")),
    # query states, DanceOPD setting; `low` is the G=1 row above
    Ablation("query", "mid (Beta(5,5))", (*DANCE, "opd.query_bias=mid")),
    Ablation("query", "high (Beta(2,5))", (*DANCE, "opd.query_bias=high")),
    Ablation("query", "uniform", (*DANCE, "opd.query_bias=uniform")),
    Ablation("query", "dense (DiffusionOPD: all T, 0.5/T^2 sum)",
             (*DANCE, "opd.query_states=0", "opd.query_weighting=diffusionopd")),
    # state source, DanceOPD setting; on-policy is the G=1 row
    Ablation("states", "off-policy, random endpoint (DanceOPD T2I)", (*DANCE, "opd.states=off_policy")),
    Ablation("states", "off-policy, field endpoint", (*DANCE, "opd.states=off_policy",
                                                      "opd.offpolicy_endpoint=field")),
]
SHARED = {"query": "G=1 per step (DanceOPD)", "states": "G=1 per step (DanceOPD)"}
"""Groups whose reference row is another group's row (low-noise query = on-policy = the DanceOPD student)."""


def _steps(row: Ablation, scale: float) -> int:
    base = DANCE_STEPS if "train.steps=150" in row.overrides else FLOW_STEPS
    return max(1, round(base * scale))


def run_overrides(row: Ablation, seed: int, out: Path, scale: float) -> list[str]:
    """The `--set` overrides of one run (the row's, then this script's)."""
    return [*row.overrides, f"train.steps={_steps(row, scale)}", f"train.seed={seed}", "report.enabled=false",
            "report.eval_every=0", "experiment.variants={}", f'output_dir="{out}"']


def step_seconds(out: Path) -> float:
    """The run's training time: the sum of its steps' `step_s` in metrics.jsonl (the last line per step: a resumed
    run logs the steps after its checkpoint again), without start-up and export."""
    from engine.metrics import read_metrics

    steps = {row["step"]: row["step_s"] for row in read_metrics(out / "metrics.jsonl")}
    return float(sum(steps.values()))


def _done(out: Path) -> bool:
    return (out / "ablation_done.json").is_file() and (out / "export" / "adapter_model.safetensors").is_file()


def train_all(jobs: list[tuple[Ablation, int, Path]], parallel: int, scale: float) -> dict[str, float]:
    """Train every (row, seed) not yet done, `parallel` at a time; returns wall seconds per finished run dir."""
    todo = [j for j in jobs if not _done(j[2])]
    # the dense row costs ~3.6x a one-state row (10 query chunks per rollout instead of 1): start it first
    todo.sort(key=lambda j: -(10 if "opd.query_states=0" in j[0].overrides else 1))
    running: list[tuple[subprocess.Popen, Path, float]] = []
    times: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    while todo or running:
        while todo and len(running) < parallel:
            row, seed, out = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(CONFIG)]
            for o in run_overrides(row, seed, out, scale):
                cmd += ["--set", o]
            log = open(out / "ablation.log", "ab")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), out,
                            time.perf_counter()))
            print(f"start {out.relative_to(out.parents[1])}", flush=True)
        time.sleep(2)
        for proc, out, t0 in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, out, t0))
            if proc.returncode != 0:
                raise RuntimeError(f"run {out} failed (exit {proc.returncode}); see {out / 'ablation.log'}")
            times[str(out)] = time.perf_counter() - t0
            (out / "ablation_done.json").write_text(json.dumps({"wall_s": times[str(out)]}) + "\n")
            print(f"done  {out.relative_to(out.parents[1])} in {times[str(out)]:.0f} s", flush=True)
    return times


def measure(jobs: list[tuple[Ablation, int, Path]], scale: float) -> dict[str, dict[str, dict[str, float]]]:
    """{row name: {column: {mean, std over seeds}}} plus the baseline rows, measured by the report's code."""
    import torch

    from engine.config import load_config
    from engine.worlds.toy.report import measure_rows
    from engine.worlds.toy.rewards import COLUMNS

    torch.set_num_threads(1)
    config = load_config(CONFIG, ["report.seeds=[0]", "report.eval_every=0"])
    runs = [(f"{row.name}|{seed}", load_config(CONFIG, run_overrides(row, seed, out, scale)))
            for row, seed, out in jobs]
    rows = measure_rows(config, runs)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r.kind != "student":
            table[r.name] = r.cells
    by_row: dict[str, list[dict[str, float]]] = {}
    for r in rows:
        if r.kind == "student":
            by_row.setdefault(r.name.split("|")[0], []).append({c: r.mean(c) for c in COLUMNS})
    for name, vals in by_row.items():
        table[name] = {c: {"mean": float(np.mean([v[c] for v in vals])), "std": float(np.std([v[c] for v in vals])),
                           "n": len(vals)} for c in COLUMNS}
    return table


def markdown(table: dict[str, dict[str, dict[str, float]]], rows: list[Ablation]) -> str:
    """The table: baselines, then each group's rows (mean ± std over training seeds)."""
    from engine.worlds.toy.rewards import COLUMNS

    def line(label: str, cells: dict[str, dict[str, float]]) -> str:
        return f"| {label} | " + " | ".join(f"{cells[c]['mean']:.3f} ± {cells[c]['std']:.3f}" for c in COLUMNS) + " |"

    out = ["| group | row | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in ("base", "merge (SVD)"):
        if name in table:
            out.append(line(f"baseline | {name}", table[name]))
    for group in dict.fromkeys(r.group for r in rows):
        if group in SHARED and SHARED[group] in table:
            out.append(line(f"{group} | {SHARED[group]} (= the routing row)", table[SHARED[group]]))
        for r in rows:
            if r.group == group and r.name in table:
                out.append(line(f"{group} | {r.name}", table[r.name]))
    return "\n".join(out) + "\n"


def write_docs(text: str, path: Path) -> None:
    """Replace the table between the `<!-- ablations:begin -->` / `<!-- ablations:end -->` markers of `path`."""
    doc = path.read_text()
    a, b = "<!-- ablations:begin -->", "<!-- ablations:end -->"
    if a not in doc or b not in doc:
        raise ValueError(f"{path} has no {a} ... {b} block")
    head, rest = doc.split(a, 1)
    path.write_text(head + a + "\n" + text + b + rest.split(b, 1)[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", default=None, help="row slugs (default: all); see --list")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="out/ablations")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every row's train.steps")
    ap.add_argument("--table-only", action="store_true", help="measure the finished runs, train nothing")
    ap.add_argument("--write-docs", action="store_true", help="put the table into docs/ablations.md")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for r in ROWS:
            print(f"{r.slug:50s} {r.group:8s} {' '.join(r.overrides)}")
        return 0
    rows = [r for r in ROWS if args.rows is None or r.slug in args.rows]
    out = Path(args.out)
    jobs = [(r, s, out / r.slug / f"seed_{s}") for r in rows for s in args.seeds]
    t0 = time.perf_counter()
    times = {} if args.table_only else train_all(jobs, args.jobs, args.steps_scale)
    train_s = time.perf_counter() - t0
    table = measure([j for j in jobs if _done(j[2])], args.steps_scale)
    text = markdown(table, rows)
    total = time.perf_counter() - t0
    run_s = [step_seconds(j[2]) for j in jobs if _done(j[2])]
    footer = (f"\n{len(run_s)} runs ({len(rows)} rows x seeds {args.seeds}), train.steps x {args.steps_scale:g} "
              f"(Flow-OPD rows {_steps(rows[0], args.steps_scale)}, DanceOPD rows "
              f"{_steps(Ablation('', '', tuple(DANCE)), args.steps_scale)} steps); training time per run (sum of "
              f"step_s, one thread, a shared 2-core machine) {np.mean(run_s):.0f} s mean ({min(run_s):.0f}-"
              f"{max(run_s):.0f} s), {sum(run_s) / 3600:.1f} h in all; this invocation: {train_s:.0f} s training "
              f"({len(times)} runs, {args.jobs} side by side), {total - train_s:.0f} s measuring.\n")
    (out / "table.md").write_text(text + footer)
    (out / "table.json").write_text(json.dumps({"rows": table, "seeds": args.seeds, "steps_scale": args.steps_scale,
                                                "run_wall_s": run_s}, indent=1) + "\n")
    print(text + footer)
    if args.write_docs:
        write_docs(text + footer, REPO / "docs" / "ablations.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
