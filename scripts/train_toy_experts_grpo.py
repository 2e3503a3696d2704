"""The miniature world's experts made by Flow-GRPO from the analytic rewards (as the Flow-OPD paper makes its
experts), GRPO-Mix beside them, then the default job's OPD students distilled from the GRPO experts; 3 seeds.

    nice -n 10 python scripts/train_toy_experts_grpo.py                  # out/grpo/seed_{0,1,2}/... + table.md
    python scripts/train_toy_experts_grpo.py --seeds 0 --jobs 2 --out out/grpo

Per seed N (`train.seed = N` everywhere):
1. three GRPO experts (configs/toy_grpo.toml, one task each: compose, text, aesthetic) and GRPO-Mix
   (configs/toy_grpo_mix.toml), trained as child processes, `--jobs` at a time (1 thread each);
2. the default job (configs/toy.toml: the Flow-OPD student and the DanceOPD variant) with the GRPO experts as its
   teachers and the GRPO-Mix and SFT-expert adapters as extra rows of its report (`report.rows`);
3. the table over seeds (mean ± std): rows base, GRPO expert: <task>, merges of the GRPO experts, the OPD students,
   GRPO-Mix, the shipped SFT experts; and the reward-hacking check: the quality column of every GRPO run's reward
   curve (rewards.jsonl) at its first and its last point.
A finished run is never re-run; an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = ("compose", "text", "aesthetic")


def _weights(task: str | None) -> str:
    w = {t: (1.0 if task in (None, t) else 0.0) for t in TASKS}
    return "data.task_weights={" + ", ".join(f"{t} = {v}" for t, v in w.items()) + "}"


def _train(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run the pending commands, `parallel` at a time; stop on the first failure (its log is named)."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, log = pending.pop(0)
            print("+", " ".join(cmd), flush=True)
            running.append((_train(cmd, log), log))
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                if proc.returncode != 0:
                    raise SystemExit(f"run failed (exit {proc.returncode}); see {log}")


def grpo_runs(seed: int, out: Path) -> dict[str, Path]:
    """Run dir of every GRPO run of `seed`: expert-<task> and mix."""
    root = out / f"seed_{seed}"
    return {**{f"expert-{t}": root / f"grpo-{t}" for t in TASKS}, "mix": root / "grpo-mix"}


def main(argv: list[str] | None = None) -> int:
    """Train, distill and tabulate (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="out/grpo")
    ap.add_argument("--jobs", type=int, default=2, help="GRPO runs trained at the same time")
    ap.add_argument("--phase", choices=("all", "experts", "students", "table"), default="all")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    train = [sys.executable, str(REPO / "engine" / "train.py")]
    t0 = time.perf_counter()
    if args.phase in ("all", "experts"):
        jobs = []
        for seed in args.seeds:
            runs = grpo_runs(seed, out)
            for t in TASKS:
                run = runs[f"expert-{t}"]
                if not (run / "export").is_dir():
                    jobs.append(([*train, "--config", str(REPO / "configs" / "toy_grpo.toml"), "--output-dir",
                                  str(run), "--set", f"train.seed={seed}", "--set", _weights(t)], run / "train.log"))
            if not (runs["mix"] / "export").is_dir():
                jobs.append(([*train, "--config", str(REPO / "configs" / "toy_grpo_mix.toml"), "--output-dir",
                              str(runs["mix"]), "--set", f"train.seed={seed}"], runs["mix"] / "train.log"))
        _run_all(jobs, args.jobs)
    if args.phase in ("all", "students"):
        for seed in args.seeds:
            runs = grpo_runs(seed, out)
            student = out / f"seed_{seed}" / "opd"
            if (student / "report.json").is_file():
                continue
            sets = [f"train.seed={seed}"]
            sets += [f'teachers.{i}.path="{runs[f"expert-{t}"] / "export"}"' for i, t in enumerate(TASKS)]
            rows = {"GRPO-Mix": runs["mix"] / "export",
                    **{f"SFT expert: {t}": f"toy:experts/{t}" for t in TASKS}}
            sets.append("report.rows={" + ", ".join(f'"{k}" = "{v}"' for k, v in rows.items()) + "}")
            cmd = [*train, "--output-dir", str(student), *sum((["--set", s] for s in sets), [])]
            _run_all([(cmd, student / "train.log")], 1)
    table = summarise(out, args.seeds)
    (out / "table.md").write_text(table + f"\nwall seconds (this invocation): {time.perf_counter() - t0:.0f}\n")
    print(table)
    return 0


def summarise(out: Path, seeds: list[int]) -> str:
    """The table over seeds and the reward-hacking check, as markdown."""
    reports = [json.loads((out / f"seed_{s}" / "opd" / "report.json").read_text()) for s in seeds
               if (out / f"seed_{s}" / "opd" / "report.json").is_file()]
    lines: list[str] = []
    if reports:
        columns = reports[0]["columns"]
        lines += [f"| model | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
        for name in reports[0]["rows"]:
            label = name.replace("expert: ", "GRPO expert: ") if name.startswith("expert: ") else name
            cells = []
            for c in columns:
                vals = [r["rows"][name][c]["mean"] for r in reports]
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
            lines.append(f"| {label} | {' | '.join(cells)} |")
        lines.append(f"\n{len(reports)} seed(s): {seeds[:len(reports)]}")
    lines += ["", "Reward hacking: quality (quick subset) at the first and the last point of each GRPO run's curve:",
              "", "| run | quality first | quality last | own reward first | own reward last |",
              "|---|---|---|---|---|"]
    for key in (*[f"expert-{t}" for t in TASKS], "mix"):
        first, last, own0, own1 = [], [], [], []
        for s in seeds:
            path = grpo_runs(s, out)[key] / "rewards.jsonl"
            if not path.is_file():
                continue
            pts = {}
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    pts[int(row["step"])] = row
                except (ValueError, KeyError):
                    continue
            if not pts:
                continue
            a, b = pts[min(pts)], pts[max(pts)]
            col = key.removeprefix("expert-") if key != "mix" else "average"
            first.append(a["quality"])
            last.append(b["quality"])
            own0.append(a[col])
            own1.append(b[col])
        if first:
            cell = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"  # noqa: E731
            lines.append(f"| {key} | {cell(first)} | {cell(last)} | {cell(own0)} | {cell(own1)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
