"""Train the toy world's shipped weights: text encoder + base transformer, then one expert LoRA per task.

    nice -n 10 python scripts/train_toy_world.py                  # writes engine/worlds/toy/weights/
    nice -n 10 python scripts/train_toy_world.py --out /tmp/w --base-steps 300 --expert-steps 50

1. base: the encoder and the transformer trained jointly by flow matching on the imperfect mixture
   (`world.base_example`: label noise, degraded images), prompt dropout for CFG; the EMA weights are shipped.
2. experts: the frozen base gets one LoRA per task (peft `add_adapter` on the 8 attention projections),
   fine-tuned on that task's clean targets only (`world.clean_example`), prompt dropout kept.
3. eval: the rows of base, each expert and the two merges, recorded in `eval.json` (tests reproduce them).
Every random draw comes from seeded generators; on one machine a rerun writes the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.adapters.export import export_adapter  # noqa: E402
from engine.adapters.lora import AdapterSwitch, LoraSpec, add_adapter, freeze_for_training  # noqa: E402
from engine.backends import get_backend
from engine.files import write_sha256sums  # noqa: E402
from engine.worlds.toy.encoder import ToyTextEncoder  # noqa: E402
from engine.worlds.toy.eval import EvalSettings, add_merge, evaluate, evaluate_seeds  # noqa: E402
from engine.worlds.toy.model import EXPERTS, TOY_TRANSFORMER, WEIGHTS_DIR, flow_matching_loss, new_transformer  # noqa: E402
from engine.worlds.toy.world import Imperfection, base_example, batch, clean_example, eval_prompts  # noqa: E402
from scripts._toy_training import log, lr_at  # noqa: E402

CHECK_PROMPT_STRIDE = 2


def drop_prompts(prompts: list[str], rng: np.random.Generator, p: float) -> list[str]:
    return ["" if rng.random() < p else q for q in prompts]


def train_base(args: argparse.Namespace) -> tuple[torch.nn.Module, ToyTextEncoder]:
    model = new_transformer(args.seed)
    torch.manual_seed(args.seed + 1)
    encoder = ToyTextEncoder()
    params = list(model.parameters()) + list(encoder.parameters())
    log(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M transformer + "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e3:.1f} k encoder parameters")
    opt = torch.optim.AdamW(params, lr=args.base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_model, ema_enc = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    imp = Imperfection()
    t0, avg = time.time(), 0.0
    for step in range(args.base_steps):
        prompts, x0 = batch([base_example(rng, imp) for _ in range(args.batch)])
        prompts = drop_prompts(prompts, rng, args.cfg_dropout)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.base_steps, args.base_lr, args.warmup)
        loss = flow_matching_loss(model, torch.from_numpy(x0), encoder(encoder.tokenize(prompts)), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((model, ema_model), (encoder, ema_enc)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - decay)
        avg = 0.98 * avg + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % args.log_every == 0:
            log(f"base step {step + 1}/{args.base_steps} loss {avg:.4f} ({time.time() - t0:.0f} s)")
    return ema_model.eval(), ema_enc.eval()


def train_expert(model: torch.nn.Module, encoder: ToyTextEncoder, task: str, args: argparse.Namespace) -> None:
    name = EXPERTS[task]
    add_adapter(model, name, LoraSpec(rank=args.rank, alpha=args.alpha))
    params = freeze_for_training(model, name)
    switch = AdapterSwitch(model)
    switch.activate(name)
    opt = torch.optim.AdamW(params, lr=args.expert_lr, betas=(0.9, 0.99), weight_decay=0.0)
    seed = args.seed + 100 + list(EXPERTS).index(task)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0, avg = time.time(), 0.0
    model.train()
    for step in range(args.expert_steps):
        prompts, x0 = batch([clean_example(task, rng) for _ in range(args.batch)])
        prompts = drop_prompts(prompts, rng, args.cfg_dropout)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.expert_steps, args.expert_lr, min(args.warmup, args.expert_steps // 10 + 1))
        loss = flow_matching_loss(model, torch.from_numpy(x0), encoder.encode(prompts), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = 0.95 * avg + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % args.log_every == 0:
            log(f"expert {task} step {step + 1}/{args.expert_steps} loss {avg:.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    freeze_for_training(model, None)
    switch.activate(None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared 2-core machine: 2 threads thrash under load (1-9 s vs 0.2 s/step)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--base-steps", type=int, default=3000)
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--expert-steps", type=int, default=400)
    ap.add_argument("--expert-lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--eval-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--skip-base", action="store_true", help="reuse OUT/base and OUT/encoder")
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.time()
    timings: dict[str, float] = {}
    if args.skip_base:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(str(out / "base")).eval()
        encoder = ToyTextEncoder.from_pretrained(out / "encoder")
    else:
        model, encoder = train_base(args)
        timings["base_s"] = time.time() - t_start
        model.save_pretrained(str(out / "base"))
        write_sha256sums(out / "base")  # load_transformer refuses a file that differs from it
        encoder.save_pretrained(out / "encoder")
    model.requires_grad_(False)
    encoder.requires_grad_(False)
    for task in EXPERTS:
        t0 = time.time()
        train_expert(model, encoder, task, args)
        export_adapter(model, out / "experts" / task, get_backend("sd3"), EXPERTS[task])
        timings[f"expert_{task}_s"] = time.time() - t0
    t0 = time.time()
    settings = EvalSettings()
    rows = {"base": evaluate_seeds(model, encoder, None, settings, args.eval_seeds)}
    for task, name in EXPERTS.items():
        rows[task] = evaluate_seeds(model, encoder, name, settings, args.eval_seeds)
    for method in ("average", "svd"):
        name = add_merge(model, method, list(EXPERTS.values()), args.rank, args.alpha)
        rows[f"merge-{method}"] = evaluate_seeds(model, encoder, name, settings, args.eval_seeds)
    # the small, fast version of the table that tests/test_toy_weights.py reproduces
    check_settings = EvalSettings(samples_per_prompt=2)
    check_prompts = eval_prompts()[::CHECK_PROMPT_STRIDE]
    check = {name: evaluate(model, encoder, adapter, check_settings, check_prompts)
             for name, adapter in [("base", None), *((t, n) for t, n in EXPERTS.items())]}
    for method in ("average", "svd"):
        name = add_merge(model, method, list(EXPERTS.values()), args.rank, args.alpha)
        check[f"merge-{method}"] = evaluate(model, encoder, name, check_settings, check_prompts)
    timings["eval_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    record = {
        "settings": asdict(settings),
        "seeds": args.eval_seeds,
        "rows": rows,
        "check": {"settings": asdict(check_settings), "prompt_stride": CHECK_PROMPT_STRIDE, "rows": check,
                  "merge": {"rank": args.rank, "alpha": args.alpha}},
        "encoder": encoder.config() | {"vocab": None},
        "train_args": vars(args) | {"out": None},
        "transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in TOY_TRANSFORMER.items()},
        "timings": timings,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{args.threads} threads",
    }
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    for name, row in rows.items():
        log(f"{name:14s} " + " ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in row.items()))
    log(f"done in {timings['total_s']:.0f} s: {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
