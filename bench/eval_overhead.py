"""What [validation] and [tracking] cost the default job on its off-cycle steps (issue 15: at most 5%).

    python bench/eval_overhead.py --steps 30 --repeats 3 --json bench/results/<date>-cpu-eval-overhead.json

Two short runs of the default job's config (configs/toy.toml: report, reward curve and variants off, `train.steps`
= --steps) train side by side, each in its own process with one thread, so both see the same machine load:
  on:  the config as shipped: TensorBoard on, validation every 25 steps with the world's scorers;
  off: `tracking.tensorboard = false`, `validation.every = 0`.
Each step's wall time is measured from one step callback to the next (the train step, its metrics line and every
callback: the tracker feed, the validation's due-check), leaving out the steps where validation runs (0, every
25th, the last) and where a checkpoint is written. Reported: the median off-cycle step of each run, their ratio
(median over repeats); and, timed directly inside the "on" run, the eval callbacks' own time per off-cycle step, the
one-time setup and close of the trackers and validation, and each validation's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["report.enabled=false", "report.eval_every=0", "experiment.variants={}"]
OFF = ["tracking.tensorboard=false", "validation.every=0"]


def child(out: Path, steps: int, on: bool, result: Path) -> None:
    """One run in this process: per-step intervals, setup and validation times into `result` (JSON)."""
    sys.path.insert(0, str(REPO))
    from engine.config import load_config
    from engine.eval.callbacks import EvalCallbacks
    from engine.trainer import Trainer

    cfg = load_config(REPO / "configs" / "toy.toml",
                      [*BASE, f"train.steps={steps}", f'output_dir="{out}"', *([] if on else OFF)])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    evals = EvalCallbacks(cfg, trainer)
    setup = time.perf_counter() - t0
    stamps: dict[int, float] = {}
    spent: dict[int, float] = {}  # seconds inside the eval callbacks after step n (timed directly)

    def timed(cb: object) -> object:
        def run(view: object, n: int) -> None:
            t = time.perf_counter()
            cb(view, n)  # type: ignore[operator]
            spent[n] = spent.get(n, 0.0) + time.perf_counter() - t
        return run

    trainer.train([*map(timed, evals.callbacks), lambda view, n: stamps.__setitem__(n, time.perf_counter())])
    t0 = time.perf_counter()
    evals.close()
    close = time.perf_counter() - t0
    trainer.close()
    every, save = cfg.validation.every or 25, cfg.train.save_every
    on_cycle = {n for n in stamps if n % every == 0 or n == steps}
    ckpt = {n + 1 for n in stamps if save and n % save == 0}  # the interval after a checkpoint includes it
    steps_s = {n: stamps[n] - stamps[n - 1] for n in stamps if n - 1 in stamps}
    off = [s for n, s in steps_s.items() if n not in on_cycle and n not in ckpt]
    valid = [s for n, s in steps_s.items() if n in on_cycle and n not in ckpt]
    result.write_text(json.dumps({"off_cycle": off, "on_cycle": valid, "setup_s": setup, "close_s": close,
                                  "callbacks_off_cycle": [spent.get(n, 0.0) for n in steps_s if n not in on_cycle],
                                  "callbacks_on_cycle": [spent.get(n, 0.0) for n in stamps if n in on_cycle]}))


def main() -> int:
    """Run the pairs and print (and write) the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.out), args.steps, args.child == "on", Path(args.result))
        return 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            procs, files = [], {}
            for mode in ("on", "off"):
                files[mode] = Path(tmp) / f"{mode}{r}.json"
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--out",
                     str(Path(tmp) / f"run-{mode}{r}"), "--result", str(files[mode])], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for p in procs:
                if p.wait() != 0:
                    raise SystemExit(f"a benchmark run failed (exit {p.returncode})")
            pairs.append({m: json.loads(f.read_text()) for m, f in files.items()})
    rows = []
    for i, p in enumerate(pairs):
        on, off = statistics.median(p["on"]["off_cycle"]), statistics.median(p["off"]["off_cycle"])
        cb = statistics.median(p["on"]["callbacks_off_cycle"])
        rows.append({"repeat": i, "on_median_step_s": on, "off_median_step_s": off, "ratio": on / off,
                     "setup_s": p["on"]["setup_s"], "close_s": p["on"]["close_s"], "callbacks_off_cycle_s": cb,
                     "validation_s": p["on"]["callbacks_on_cycle"]})
        print(f"repeat {i}: off-cycle median step {on:.3f} s (on) vs {off:.3f} s (off): x{on / off:.3f}; the eval "
              f"callbacks {1e3 * cb:.2f} ms per off-cycle step ({100 * cb / on:.3f}%); setup "
              f"{rows[-1]['setup_s']:.2f} s, close {rows[-1]['close_s']:.2f} s; validations "
              f"{', '.join(f'{v:.2f}' for v in rows[-1]['validation_s'])} s")
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio over {len(rows)} repeats: {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
    if args.json:
        import platform

        import torch

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({
            "bench": "eval_overhead", "steps": args.steps, "repeats": rows, "median_ratio": ratio,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch":
            torch.__version__, "commit": commit, "command": " ".join(sys.argv)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
