"""flowopd training entry point.

    deepspeed engine/train.py                                  # the embedded default: the miniature world's
                                                               # Flow-OPD + DanceOPD students and their report
    deepspeed engine/train.py --config configs/tiny.toml --output-dir out/tiny
    deepspeed --num_gpus 8 engine/train.py --config configs/sd35m_flow_opd.toml --output-dir runs/flow_opd \
        --set model.path=/models/sd35m --set train.steps=2000
    python engine/train.py --config configs/tiny.toml          # the same run, single process, no launcher

Re-running the same command resumes from the newest complete checkpoint in the output dir, with the config that
checkpoint was trained with: a re-run that changes what training computes is refused with the list of changed
keys (`--allow-config-change` goes on with the new values), and a run dir whose checkpoints are gone while
metrics.jsonl holds later steps is refused too (`--restart` starts over). Multi-node launches: docs/multinode.md.
Exit codes: 0 done, 2 invalid config (nothing started), 1 the run stopped (the message says why; see
docs/reliability.md). A rank stuck in a step for longer than `train.step_timeout` ends the job naming the rank and
the phase; a failed or timed-out collective (a dead or stuck peer) ends the rank with a message instead of hanging;
`FLOWOPD_DIST_TIMEOUT` (seconds, default 600) bounds the waits outside steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

# OpenMP threads spin-wait between parallel regions; on a CPU shared with other processes two spinning threads
# starve each other. Measured on a 2-core machine at load average ~5 (configs/tiny.toml, median step): 13.4 s
# with the default (active) policy, 0.59 s with PASSIVE, 0.70 s with one thread. Read when torch loads libgomp,
# so it is set before anything imports torch; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # `deepspeed engine/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="On-policy distillation of flow-matching MMDiT models")
    parser.add_argument("--config", default=None, help="TOML/JSON config (default: the embedded default)")
    parser.add_argument("--output-dir", default=None, help="run directory (overrides output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--profile-steps", default=None, metavar="A:B",
                        help="bracket steps [A, B) with cudaProfilerStart/Stop (nsys --capture-range=cudaProfilerApi)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config changed what training computes (each change is logged; the "
                             "checkpoint's config is kept as config.step_<N>.toml)")
    parser.add_argument("--restart", action="store_true",
                        help="start at step 0 although metrics.jsonl holds steps no checkpoint is left for (the old "
                             "file is kept as metrics.before-restart.jsonl)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the config (exit 2 on any problem, nothing written), run it (exit 1 with a message if it stops)."""
    args = parse_args(argv)
    overrides = list(args.set)
    if args.output_dir is not None:  # `--output-dir ""` is refused by validation, not ignored
        overrides.append(f"output_dir={args.output_dir!r}".replace("'", '"'))
    if args.profile_steps:
        overrides.append(f'train.profile_steps="{args.profile_steps}"')
    try:
        config = load_config(args.config, overrides, paths=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from engine.experiment import run  # heavy imports after the config is known to be valid
    from engine.resume import ResumePolicy

    try:
        run(config, ResumePolicy(args.allow_config_change, args.restart))
    except Exception as exc:  # every failure ends in one clear line (plus a traceback when unexpected)
        return _fail(exc, config.output_dir)
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    from engine.errors import AdapterError, CheckpointError, ModelLoadError, RoutingError
    from engine.experiment import VariantError

    return (ConfigError, CheckpointError, ModelLoadError, AdapterError, RoutingError, FloatingPointError, OSError,
            VariantError)


def _fail(exc: Exception, output_dir: str) -> int:
    """Report why the run stopped. Errors the engine raises on purpose print their message; anything else its
    traceback. With several ranks the process then exits at once: after a collective failed, interpreter
    shutdown can block or abort in the process group's destructor (measured: gloo aborts with SIGABRT)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {rank}/{world}: " if world > 1 else ""
    if not isinstance(exc, _expected_errors()):
        traceback.print_exc()
    text = str(exc)
    from engine.distributed import dist_timeout, is_collective_error

    if world > 1 and is_collective_error(exc):
        from engine.watchdog import last_diagnosis

        seen = last_diagnosis()
        text = (f"communication with another rank failed ({text.splitlines()[0] if text else type(exc).__name__}). "
                f"Another rank probably died or is stuck (collective timeout {dist_timeout().total_seconds():g} s, "
                f"FLOWOPD_DIST_TIMEOUT){f'; the watchdog saw: {seen}' if seen else ''}; see its log. Re-run the same "
                f"command to resume from the newest complete checkpoint in {output_dir}/checkpoints")
    print(f"error: {where}{text}", file=sys.stderr, flush=True)
    if world > 1:
        sys.stdout.flush()
        os._exit(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
