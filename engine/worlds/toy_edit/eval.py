"""Evaluate a model of the editing world: one table row (t2i, local_edit, global_edit, preservation, average).

    python -m engine.worlds.toy_edit.eval                     # base and each shipped expert, seed 0
    python -m engine.worlds.toy_edit.eval --row base --seeds 0 1 2 --json out.json

Sampling is the deterministic Euler ODE `x' = x + (sigma' - sigma) v` over Z-Image's schedule
(`ZImageBackend.sigmas`: shift(linspace(1, 1/n, n)), shift 3) from fixed per-sample noise: sample j of eval item i
starts from the noise of seed (seed, i, j), independent of batching (as engine/eval.py does for the T2I world). An
edit row's source latent stays clean at every step; only the target is integrated. CFG, when asked for, is
v_u + a (v_c - v_u) with the unconditional row keeping the source image.
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

from engine.backends.zimage.backend import ZImageBackend
from engine.backends.zimage.cond import ZImageCond
from engine.backends.zimage.encoders import HashPromptEncoder
from engine.backends.zimage.forward import zimage_velocity
from engine.worlds.toy_edit.model import EXPERTS, LATENT_SHAPE, WEIGHTS_DIR, activate, conditioning, load_world
from engine.worlds.toy_edit.rewards import COLUMNS, score_row
from engine.worlds.toy_edit.world import TASKS, Scene, eval_items, render


@dataclass(frozen=True)
class EvalSettings:
    """How a row is measured (the defaults are the recorded setting of eval.json)."""

    samples_per_item: int = 2
    """N samples per eval item."""
    steps: int = 10
    """Euler ODE steps."""
    shift: float = 3.0
    """Schedule shift (Z-Image-Turbo's scheduler)."""
    cfg: float = 1.0
    """Engine CFG scale a (1.0 = unguided; Z-Image's guidance_scale g is a - 1)."""
    seed: int = 0
    batch: int = 256
    """Rows per forward (does not change the result beyond float summation order)."""


def initial_noise(n_items: int, samples: int, seed: int, shape: Sequence[int] = LATENT_SHAPE) -> torch.Tensor:
    """[n_items * samples, *shape]; row i * samples + j from generator seed (seed, i, j)."""
    out = torch.empty(n_items * samples, *shape)
    for i in range(n_items):
        for j in range(samples):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0]))
            out[i * samples + j] = torch.randn(tuple(shape), generator=g)
    return out


VelocityFn = Callable[[torch.Tensor, torch.Tensor, ZImageCond], torch.Tensor]
"""(x [B, C, H, W], sigma [B], cond) -> velocity, with whatever adapter and guidance the caller applies (the
trainer's `student_velocity` is one)."""


@torch.no_grad()
def integrate(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
              shift: float) -> torch.Tensor:
    """Euler ODE x' = x + (sigma' - sigma) v(x, sigma) over Z-Image's schedule, from `noise` (sigma 1) to sigma 0."""
    sigmas = ZImageBackend().sigmas(steps, shift).to(noise.device)
    x = noise.float().clone()
    for i in range(steps):
        v = velocity(x, sigmas[i].expand(x.shape[0])).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@torch.no_grad()
def ode_sample(model: torch.nn.Module, noise: torch.Tensor, cond: ZImageCond, settings: EvalSettings,
               uncond: ZImageCond | None = None) -> torch.Tensor:
    """Euler ODE from `noise` (sigma 1) to sigma 0 for the target latents; `uncond` rows for CFG."""
    def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = zimage_velocity(model, x, s, cond).float()
        if settings.cfg != 1.0:
            v_u = zimage_velocity(model, x, s, uncond).float()
            v = v_u + settings.cfg * (v - v_u)
        return v

    return integrate(velocity, noise, settings.steps, settings.shift)


def item_rows(encoder: HashPromptEncoder, items: Sequence[tuple[str, Scene | None]], samples: int
              ) -> tuple[list[str], list[np.ndarray | None], ZImageCond]:
    """(prompts, sources, conditioning) of `samples` rows per item, item-major."""
    prompts = [p for p, _ in items for _ in range(samples)]
    sources = [None if s is None else render(s) for _, s in items for _ in range(samples)]
    return prompts, sources, conditioning(encoder, prompts, sources)


def sample_items(model: torch.nn.Module, encoder: HashPromptEncoder, items: Sequence[tuple[str, Scene | None]],
                 settings: EvalSettings = EvalSettings()) -> tuple[torch.Tensor, list[str], list[np.ndarray | None]]:
    """(images [len(items) * N, 3, 16, 16] clamped to [-1, 1], prompts, sources) item-major, N per item."""
    n = settings.samples_per_item
    prompts, sources, cond = item_rows(encoder, items, n)
    noise = initial_noise(len(items), n, settings.seed)
    uncond = cond.uncond_twin(encoder.encode([""])) if settings.cfg != 1.0 else None
    outs = []
    for a in range(0, noise.shape[0], settings.batch):
        sl = slice(a, a + settings.batch)
        outs.append(ode_sample(model, noise[sl], cond[sl], settings, None if uncond is None else uncond[sl]))
    return torch.cat(outs).clamp(-1.0, 1.0), prompts, sources


@torch.no_grad()
def sample_with(velocity: VelocityFn, encoder: HashPromptEncoder, items: Sequence[tuple[str, Scene | None]],
                settings: EvalSettings = EvalSettings(), device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, list[str], list[np.ndarray | None]]:
    """`sample_items` with any velocity function (e.g. the live student's, on `device`); images on the CPU."""
    n = settings.samples_per_item
    prompts, sources, cond = item_rows(encoder, items, n)
    noise = initial_noise(len(items), n, settings.seed)
    outs = []
    for a in range(0, noise.shape[0], settings.batch):
        chunk = cond[a : a + settings.batch].to(device)
        outs.append(integrate(lambda x, s, c=chunk: velocity(x, s, c), noise[a : a + settings.batch].to(device),
                              settings.steps, settings.shift).cpu())
    return torch.cat(outs).clamp(-1.0, 1.0), prompts, sources


def evaluate(model: torch.nn.Module, encoder: HashPromptEncoder, adapter: str | None = None,
             settings: EvalSettings = EvalSettings(), items: Sequence[tuple[str, Scene | None]] | None = None
             ) -> dict[str, float]:
    """The table row of `adapter` (None = the base) over the eval items (all tasks by default)."""
    activate(model, adapter)
    try:
        images, prompts, sources = sample_items(model, encoder, list(eval_items() if items is None else items),
                                                settings)
    finally:
        activate(model, None)
    return score_row(images, prompts, sources)


def evaluate_seeds(model: torch.nn.Module, encoder: HashPromptEncoder, adapter: str | None = None,
                   settings: EvalSettings = EvalSettings(), seeds: Sequence[int] = (0, 1, 2),
                   items: Sequence[tuple[str, Scene | None]] | None = None) -> dict[str, dict[str, float]]:
    """{column: {"mean", "std"}} over noise seeds (population std)."""
    rows = [evaluate(model, encoder, adapter, replace(settings, seed=s), items) for s in seeds]
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]}


def check_items(stride: int) -> list[tuple[str, Scene | None]]:
    """Every `stride`-th eval item of each task (the fast subset tests reproduce)."""
    return [it for t in TASKS for it in eval_items(t)[::stride]]


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m engine.worlds.toy_edit.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(WEIGHTS_DIR))
    ap.add_argument("--row", action="append", default=[], help="base or an expert task (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cfg", type=float, default=EvalSettings.cfg)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 threads thrash on the shared 2-core machine
    model, encoder = load_world(args.weights)
    settings = EvalSettings(cfg=args.cfg)
    rows = {}
    for name in args.row or ["base", *EXPERTS]:
        rows[name] = evaluate_seeds(model, encoder, None if name == "base" else EXPERTS[name], settings, args.seeds)
        print(f"| {name} | " + " | ".join(f"{rows[name][c]['mean']:.3f} ± {rows[name][c]['std']:.3f}"
                                         for c in COLUMNS) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": asdict(settings), "seeds": args.seeds, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
