"""Evaluate a model of the toy world: one table row (per-task rewards, quality, average).

    python -m engine.worlds.toy.eval                         # base, each expert, merge (average), merge (svd)
    python -m engine.worlds.toy.eval --adapter PATH          # any adapter (PEFT dir or diffusers LoRA file)
    python -m engine.worlds.toy.eval --row base --row text   # selected shipped rows
    python -m engine.worlds.toy.eval --adapter PATH --seeds 0 1 2 --json out.json

Sampling is the deterministic Euler ODE of the engine (`flow_match_sigmas` + `ode_step`, optional CFG via
`cfg_combine`) from fixed per-sample noise: sample j of prompt i always starts from the noise of seed
`(seed, i, j)`, independent of batching, so a row is reproducible bit for bit on one machine.

Function API (used by the trainer's report): `evaluate(model, encoder, adapter)` -> row dict, and
`sample_images(model, encoder, prompts, ...)` -> images.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.adapters.lora import STUDENT, load_adapter
from engine.backends.base import TextEncoder
from engine.backends.sd3.cond import SD3Cond
from engine.eval.sampling import ode_sample


@dataclass(frozen=True)
class EvalSettings:
    """How a row is measured (the defaults are the toy world's recorded setting)."""

    samples_per_prompt: int = 4
    """N samples per eval prompt."""
    steps: int = 10
    """Euler ODE steps."""
    shift: float = 3.0
    """Schedule shift of `flow_match_sigmas`."""
    cfg: float = 1.0
    """Classifier-free guidance scale (1.0 = unguided, one forward per step)."""
    seed: int = 0
    """Noise seed of the row (use 0, 1, 2 for mean +- std over seeds)."""
    batch: int = 256
    """Images per forward (does not change the result)."""


def initial_noise(n_prompts: int, samples: int, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """[n_prompts * samples, *shape] noise; row i*samples+j is drawn from generator seed (seed, i, j)."""
    out = torch.empty(n_prompts * samples, *shape)
    for i in range(n_prompts):
        for j in range(samples):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0]))
            out[i * samples + j] = torch.randn(tuple(shape), generator=g)
    return out


VelocityFn = Callable[[torch.Tensor, torch.Tensor, SD3Cond], torch.Tensor]
"""(x [B, C, H, W], sigma [B], cond) -> velocity, with whatever adapter and guidance the caller applies."""


def field_velocity_fn(model: torch.nn.Module, adapter: str | None, uncond: SD3Cond, cfg: float = 1.0) -> VelocityFn:
    """The velocity of `adapter` (None = the base) on `model`, CFG-guided by `cfg`: the trainer's own field
    evaluation (engine.fields), so eval and training see the same velocity."""
    from engine.backends.sd3.backend import predict_velocity
    from engine.fields import Field, PeftFieldEvaluator

    field = Field("eval", adapter, cfg)
    evaluator = PeftFieldEvaluator(model, predict_velocity, [field], uncond)
    return lambda x, sigma, cond: evaluator.field_velocity(field, x, sigma, cond)


@torch.no_grad()
def sample_with(
    velocity: VelocityFn,
    encoder: TextEncoder,
    prompts: Sequence[str],
    settings: EvalSettings = EvalSettings(),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[len(prompts) * N, 3, 16, 16] images in [-1, 1] (on the CPU), N per prompt (prompt-major)."""
    from engine.worlds.toy.world import CHANNELS, IMAGE_SIZE

    n = settings.samples_per_prompt
    noise = initial_noise(len(prompts), n, settings.seed, (CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    cond = encoder.encode([p for p in prompts for _ in range(n)])
    outs = []
    for s in range(0, noise.shape[0], settings.batch):
        chunk = cond[s : s + settings.batch].to(device)
        outs.append(ode_sample(velocity, noise[s : s + settings.batch].to(device), chunk, settings.steps,
                               settings.shift).cpu())
    return torch.cat(outs).clamp(-1.0, 1.0)


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    encoder: TextEncoder,
    prompts: Sequence[str],
    settings: EvalSettings = EvalSettings(),
    adapter: str | None = None,
) -> torch.Tensor:
    """[len(prompts) * N, 3, 16, 16] images in [-1, 1], N per prompt (prompt-major), with `adapter` active."""
    device = next(model.parameters()).device
    velocity = field_velocity_fn(model, adapter, encoder.encode([""]).to(device), settings.cfg)
    return sample_with(velocity, encoder, prompts, settings, device)


def evaluate(
    model: torch.nn.Module,
    encoder: TextEncoder,
    adapter: str | None = None,
    settings: EvalSettings = EvalSettings(),
    prompts: Sequence[str] | None = None,
) -> dict[str, float]:
    """The table row of `adapter` (None = the base): per-task rewards, quality, average, over the eval prompts."""
    from engine.worlds.toy.rewards import score_row
    from engine.worlds.toy.world import eval_prompts

    prompts = list(eval_prompts() if prompts is None else prompts)
    images = sample_images(model, encoder, prompts, settings, adapter)
    return score_row(images, [p for p in prompts for _ in range(settings.samples_per_prompt)])


def evaluate_seeds(
    model: torch.nn.Module,
    encoder: TextEncoder,
    adapter: str | None = None,
    settings: EvalSettings = EvalSettings(),
    seeds: Sequence[int] = (0, 1, 2),
    prompts: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """{column: {"mean", "std"}} over noise seeds (population std)."""
    rows = [evaluate(model, encoder, adapter, replace(settings, seed=s), prompts) for s in seeds]
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]}


def add_merge(model: torch.nn.Module, method: str, experts: Sequence[str], rank: int, alpha: float,
              name: str = STUDENT) -> str:
    """A `name` adapter (rank, alpha) holding the `method` merge of `experts`; returns its name."""
    from engine.worlds.report_common import add_merge as merge

    return merge(model, method, experts, rank, alpha, name)


# ------------------------------------------------------------------------------------------------------ CLI


def format_row(name: str, row: dict, columns: Sequence[str]) -> str:
    """One markdown table row of `row` (mean +- std cells where given)."""
    cells = []
    for c in columns:
        v = row[c]
        cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}" if isinstance(v, dict) else f"{v:.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module docstring)."""
    from engine.worlds.toy.model import EXPERTS, WEIGHTS_DIR, load_toy
    from engine.worlds.toy.rewards import COLUMNS

    ap = argparse.ArgumentParser(prog="python -m engine.worlds.toy.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", action="append", default=[], help="adapter dir/file to evaluate (repeatable)")
    ap.add_argument("--row", action="append", default=[],
                    help="shipped rows: base, an expert task, merge-average, merge-svd (default: all of them "
                         "unless --adapter is given)")
    ap.add_argument("--weights", default=str(WEIGHTS_DIR), help="toy weights dir (base/, encoder/, experts/)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--samples", type=int, default=EvalSettings.samples_per_prompt)
    ap.add_argument("--steps", type=int, default=EvalSettings.steps)
    ap.add_argument("--shift", type=float, default=EvalSettings.shift)
    ap.add_argument("--cfg", type=float, default=EvalSettings.cfg)
    ap.add_argument("--merge-rank", type=int, default=None,
                    help="student rank of the merge rows (default: the experts' rank)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # 2 threads thrash on a shared 2-core machine (0.2 s vs 1-9 s per step)
    settings = EvalSettings(samples_per_prompt=args.samples, steps=args.steps, shift=args.shift, cfg=args.cfg)
    model, encoder = load_toy(args.weights)
    experts = list(EXPERTS.values())
    rows_wanted = args.row or ([] if args.adapter else ["base", *EXPERTS, "merge-average", "merge-svd"])
    results: dict[str, dict] = {}
    for name in rows_wanted:
        if name == "base":
            adapter = None
        elif name in EXPERTS:
            adapter = EXPERTS[name]
        elif name in ("merge-average", "merge-svd"):
            cfg = model.peft_config[experts[0]]
            rank = args.merge_rank or cfg.r
            adapter = add_merge(model, name.split("-")[1], experts, rank, float(cfg.lora_alpha) * rank / cfg.r)
        else:
            ap.error(f"unknown row {name!r}")
        results[name] = evaluate_seeds(model, encoder, adapter, settings, args.seeds)
    for i, path in enumerate(args.adapter):
        name = f"eval_adapter_{i}"
        load_adapter(model, name, path)
        results[path] = evaluate_seeds(model, encoder, name, settings, args.seeds)
    print(f"settings: {asdict(settings)} seeds={args.seeds}")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in results.items():
        print(format_row(name, row, COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": asdict(settings), "seeds": args.seeds, "rows": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
