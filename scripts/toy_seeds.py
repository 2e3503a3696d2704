"""The README's miniature-world table: the embedded default run with 3 training seeds, rows as mean ± std.

    python scripts/toy_seeds.py                        # out/seeds/seed_{0,1,2}/ + out/seeds/table.md
    python scripts/toy_seeds.py --seeds 0 1 2 --out out/seeds -- --set train.steps=50   # extra `engine/train.py` args

Each seed is one complete `engine/train.py` run of the default config (both students, their report) with
`train.seed = N`: a different data order, rollout noise and query draws; the baseline rows (base, experts, merges)
do not depend on it and come out identical. A finished seed is not re-run (re-running resumes the unfinished one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="out/seeds")
    ap.add_argument("extra", nargs="*", help="after `--`: more engine/train.py arguments")
    args = ap.parse_args(argv)
    out = Path(args.out)
    reports, timings = [], {}
    for seed in args.seeds:
        run = out / f"seed_{seed}"
        if not (run / "report.json").is_file():
            t0 = time.perf_counter()
            cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--output-dir", str(run),
                   "--set", f"train.seed={seed}", *args.extra]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
            timings[seed] = time.perf_counter() - t0
        reports.append(json.loads((run / "report.json").read_text()))
    columns = reports[0]["columns"]
    lines = [f"| model | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for name in reports[0]["rows"]:
        cells = []
        for c in columns:
            vals = [r["rows"][name][c]["mean"] for r in reports]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    met = [sum(t["ok"] for t in r["targets"]) for r in reports]
    lines += ["", f"training seeds {args.seeds}; targets met per seed: "
              + ", ".join(f"{m}/{len(r['targets'])}" for m, r in zip(met, reports))]
    missed = sorted({t["target"] for r in reports for t in r["targets"] if not t["ok"]})
    lines += [f"- missed: {t}" for t in missed]
    if timings:
        lines.append("wall seconds per run (this invocation): "
                     + ", ".join(f"seed {s}: {t:.0f}" for s, t in timings.items()))
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
