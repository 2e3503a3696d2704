"""flowopd training entry point.

    deepspeed engine/train.py                                  # the embedded default (the miniature world)
    deepspeed engine/train.py --config configs/tiny.toml --output-dir out/tiny
    deepspeed --num_gpus 8 engine/train.py --config configs/sd35m_flow_opd.toml --output-dir runs/flow_opd \
        --set model.path=/models/sd35m --set train.steps=2000
    python engine/train.py --config configs/tiny.toml          # the same run, single process, no launcher

Re-running the same command resumes from the newest complete checkpoint in the output dir.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed engine/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="On-policy distillation of flow-matching MMDiT models")
    parser.add_argument("--config", default=None, help="TOML/JSON config (default: the embedded default)")
    parser.add_argument("--output-dir", default=None, help="run directory (overrides output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--profile-steps", default=None, metavar="A:B",
                        help="bracket steps [A, B) with cudaProfilerStart/Stop (nsys --capture-range=cudaProfilerApi)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir!r}".replace("'", '"'))
    if args.profile_steps:
        overrides.append(f'train.profile_steps="{args.profile_steps}"')
    try:
        config = load_config(args.config, overrides, paths=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from engine.trainer import Trainer  # heavy imports after the config is known to be valid

    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"done: {config.output_dir}/export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
