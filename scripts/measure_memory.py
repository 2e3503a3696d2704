"""Real-size memory and disk measurements without real weights (docs/reliability.md, "Real size"):

    # peak RSS of building an SD3.5-shaped prompt cache of 10k fake prompts (333 x 4096 + 2048 per prompt, bfloat16)
    # and of each of 2 ranks drawing its batches from it for 200 steps; the cache file is deleted afterwards
    python scripts/measure_memory.py cache --prompts 10000 --dir /tmp/flowopd-cache --ranks 2 --steps 200

    # checkpoint bytes vs the trainable state: one real training step + checkpoint of an SD3.5-M-wide model with
    # 2 of its 24 layers (same 906 MB pos_embed buffer, same LoRA targets), then the 24-layer accounting (meta device)
    python scripts/measure_memory.py checkpoint --dir /tmp/flowopd-ckpt
    # the real model on a GPU: --layers 24 --dtype bfloat16

Each measured process runs alone (a fresh interpreter), so `ru_maxrss` is its own peak resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SD35 = {"tokens": 333, "width": 4096, "pooled": 2048}


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FakeSD35Encoder:
    """SD3.5-shaped conditioning without weights: prompt i -> a fixed random pattern + i (cheap, distinct rows)."""

    def __init__(self) -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        self.pattern = torch.randn(SD35["tokens"], SD35["width"], generator=gen)
        self.pooled = torch.randn(SD35["pooled"], generator=gen)

    @property
    def identity(self) -> str:
        """Keys the cache."""
        return "fake-sd35:v1"

    def encode(self, prompts: list[str]):
        """[B, 333, 4096] + [B, 2048] float32, like SD3TextEncoder returns."""
        import torch

        from engine.backends.sd3.cond import SD3Cond

        ids = torch.tensor([float(len(p)) for p in prompts])
        return SD3Cond(self.pattern.expand(len(prompts), -1, -1) + ids[:, None, None],
                       self.pooled.expand(len(prompts), -1) + ids[:, None])


def fake_prompts(n: int) -> list[str]:
    """n distinct prompts with task tags (as a .txt prompt file would give)."""
    return [f"[{'compose' if i % 2 else 'text'}] fake prompt {i:06d}" for i in range(n)]


def cache_build(path: str, n: int) -> dict:
    """Child: build the cache (rank 0's job)."""
    import torch

    from engine.backends.sd3.cond import SD3Cond
    from engine.data.cache import load_or_build

    t0 = time.perf_counter()
    emb = load_or_build(FakeSD35Encoder(), [p.split("] ", 1)[1] for p in fake_prompts(n)], path, SD3Cond,
                        torch.bfloat16)
    return {"what": "build", "prompts": len(emb.prompts), "seconds": round(time.perf_counter() - t0, 1),
            "file_gb": round(Path(path).stat().st_size / 1e9, 2), "peak_rss_mb": round(peak_rss_mb())}


def cache_read(path: str, n: int, rank: int, world: int, steps: int) -> dict:
    """Child: one rank's reads: the sampler's batches of this rank for `steps` steps (prompts_per_step 2, group 4)."""
    import torch

    from engine.backends.sd3.cond import SD3Cond
    from engine.data.cache import load_or_build
    from engine.data.prompts import Prompt
    from engine.data.sampler import PromptSampler

    prompts = [Prompt(p.split("] ", 1)[1], p[1:p.index("]")]) for p in fake_prompts(n)]
    base = peak_rss_mb()
    emb = load_or_build(FakeSD35Encoder(), [p.text for p in prompts], path, SD3Cond, torch.bfloat16)
    sampler = PromptSampler(prompts, 0, 2, 4, 1, world, rank)
    rows, t0 = 0, time.perf_counter()
    for step in range(steps):
        cond = emb.cond(sampler.batch(step).texts)
        rows += len(cond)
    return {"what": f"rank {rank}/{world}", "rows_read": rows, "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_cache_mb": round(base), "peak_rss_mb": round(peak_rss_mb())}


def run_child(args: list[str]) -> dict:
    """Run this script's `_child` in a fresh interpreter; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "_child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cache(a: argparse.Namespace) -> None:
    """The cache measurement (see the module docstring)."""
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / "sd35_cache.safetensors")
    try:
        results = [run_child(["build", path, str(a.prompts)])]
        results += [run_child(["read", path, str(a.prompts), str(r), str(a.ranks), str(a.steps)])
                    for r in range(a.ranks)]
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    per_prompt = (SD35["tokens"] * SD35["width"] + SD35["pooled"])
    print(json.dumps({"prompts": a.prompts, "bytes_per_prompt_fp32": per_prompt * 4,
                      "bytes_per_prompt_bf16": per_prompt * 2,
                      "everything_in_memory_gb_fp32": round(a.prompts * per_prompt * 4 / 1e9, 1),
                      "results": results}, indent=1))


def measure_checkpoint(a: argparse.Namespace) -> None:
    """The checkpoint measurement (see the module docstring)."""
    import dataclasses

    import torch

    from engine.backends.sd3.presets import PRESETS
    from engine.checkpoint import checkpoint_bytes, complete_checkpoints
    from engine.config import load_config
    from engine.trainer import Trainer

    full = PRESETS["sd35-medium"]
    layers = a.layers
    cheap = dict(full.transformer, num_layers=layers, dual_attention_layers=tuple(range(min(layers - 1, 13) or 1)))
    PRESETS["sd35m-cheap"] = dataclasses.replace(full, name="sd35m-cheap", transformer=cheap)
    out = Path(a.dir) / "run"
    shutil.rmtree(out, ignore_errors=True)
    sets = ["model.preset='sd35m-cheap'", "model.latent_size=16", f"model.dtype='{a.dtype}'", "student.rank=32",
            "student.alpha=32.0", "teachers=[]", "fields=[{ name = 'base', source = 'base' }]", "init.merge='none'",
            "opd.loss='mse'", "opd.routing='step'", "opd.routes={}", "opd.weights={ base = 1.0 }", "opd.anchor=''",
            "opd.query_states=1", "rollout.sampler='ode'", "rollout.steps=2", "rollout.group_size=1",
            "rollout.cfg_scale=1.0", "opd.student_cfg=1.0", "train.steps=1", "train.save_every=1",
            "train.prompts_per_step=1", "data.max_sequence_length=256", f'output_dir="{out}"']
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    trainer = Trainer(load_config(REPO / "configs" / "tiny.toml", sets))
    try:
        buffers = sum(b.numel() * b.element_size() for b in trainer.model.buffers())
        estimate = trainer.checkpointer.check_free_space(trainer.engine)
        trainer.train()
    finally:
        trainer.close()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    tensors = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    ckpt = complete_checkpoints(out / "checkpoints")[0]
    written = checkpoint_bytes(ckpt)
    per_param = trainer.model.dtype.itemsize + 12  # module copy in the model dtype + fp32 master + Adam's 2 moments
    state = per_param * trainable
    # the full 24-layer model, counted on the meta device: LoRA r x (in + out) per targeted Linear
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        meta = SD3Transformer2DModel(**full.transformer)
    targets = trainer.config.student.targets
    lora = [(m.in_features, m.out_features) for n, m in meta.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    full_trainable = sum(32 * (i + o) for i, o in lora)
    fixed = written - state
    per_tensor = fixed / tensors
    full_written = per_param * full_trainable + per_tensor * 2 * len(lora)
    print(json.dumps({
        "cheap_model": {"layers": layers, "dtype": a.dtype, "trainable_params": trainable, "lora_tensors": tensors,
                        "frozen_buffer_bytes_not_written": buffers, "checkpoint_bytes": written,
                        "trainable_state_bytes": state, "ratio": round(written / state, 4),
                        "preflight_estimate_bytes": estimate, "files": sorted(p.name for p in ckpt.iterdir())},
        "sd35_medium_accounting": {"layers": 24, "lora_rank": 32, "trainable_params": full_trainable,
                                   "trainable_state_bytes": per_param * full_trainable,
                                   "expected_checkpoint_bytes": round(full_written),
                                   "ratio": round(full_written / (per_param * full_trainable), 4),
                                   "before_this_change_bytes": round(full_written + buffers)},
    }, indent=1))
    if not a.keep:
        shutil.rmtree(Path(a.dir), ignore_errors=True)


def main(argv: list[str]) -> int:
    """Parse the command line and run one measurement (or a child of one)."""
    if argv[:1] == ["_child"]:
        kind, path, n, *rest = argv[1:]
        res = cache_build(path, int(n)) if kind == "build" else cache_read(path, int(n), *map(int, rest))
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--prompts", type=int, default=10000)
    c.add_argument("--ranks", type=int, default=2)
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--dir", default="/tmp/flowopd-cache")
    c.add_argument("--keep", action="store_true")
    k = sub.add_parser("checkpoint")
    k.add_argument("--dir", default="/tmp/flowopd-ckpt")
    k.add_argument("--layers", type=int, default=2, help="of SD3.5-M's 24 (24 = the real model; on a GPU)")
    k.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    k.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    (measure_cache if a.what == "cache" else measure_checkpoint)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
