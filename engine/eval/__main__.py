"""`python -m engine.eval`: score a real model (and its adapters) on prompt sets with scorers from local weights.

    python -m engine.eval --model /models/stable-diffusion-3.5-medium --adapter runs/flow_opd/export \\
        --prompts geneval=/data/Flow-OPD/dataset/geneval/test_metadata.jsonl \\
        --prompts ocr=/data/Flow-OPD/dataset/ocr/test.txt --prompts pick=/data/Flow-OPD/dataset/pickscore/test.txt \\
        --scorers geneval=/scorers/geneval,ocr=/scorers/trocr,pickscore=/scorers/pickscore \\
        --scorers deqa=http://127.0.0.1:18086 --score-on pickscore=pick,deqa=pick --samples 4 --out eval/flow_opd

Writes OUT/table.md and OUT/table.json (one row per model: the base without --adapter, else each adapter, plus the
base with --with-base; one column per scorer, the Flow-OPD card's GenEval, OCR, DeQA, PickScore and Average =
mean(GenEval, OCR, DeQA/5, PickScore/26) when those scorers are given), OUT/samples/<row>.png (the first 8 prompts x
N samples) and OUT/scores/<row>.jsonl (every image's scores). `--prompts [SET=]FILE`: with SET, only the scorers
named in `--score-on` for SET score those images, e.g. `--score-on pickscore=pickscore,deqa=pickscore`; without, a
scorer scores every image it applies to (GenEval the rows with GenEval metadata, OCR the prompts that quote a
text). Deterministic: sample j of prompt i starts from the noise of (seed, i, j) (engine/eval/sampling.py), Euler
ODE, 40 steps, CFG 4.5 and T5 length 128 by default, as Flow-OPD's evaluation (scripts/train_sd3_opd_mix.py:443-486).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.eval.prompts import EvalPrompt, load_eval_prompts


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """`a=x,b=y` items (repeatable, comma-separated) as {a: x, b: y}; ValueError naming `what` for a bad item."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not name:
                raise ValueError(f"{what} {part!r}: expected NAME=VALUE")
            out[name.strip()] = value.strip()
    return out


def load_sets(specs: Sequence[str], limit: int) -> list[tuple[str, EvalPrompt]]:
    """(set name, prompt) of every `--prompts [SET=]FILE` (SET = "" when not named)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or name.startswith(("builtin:", ".")):
            name, path = "", spec
        out += [(name, p) for p in load_eval_prompts(path, limit)]
    return out


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and v == v and abs(v) != float("inf") else None


def slug(name: str) -> str:
    """A file-name slug of a row name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "row"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (module docstring); exit 2 on bad arguments or missing inputs, before any model is loaded."""
    ap = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local pipeline dir of the model family (or a `<world>:` path)")
    ap.add_argument("--adapter", action="append", default=[], help="LoRA adapter to score (repeatable)")
    ap.add_argument("--with-base", action="store_true", help="also score the base model when --adapter is given")
    ap.add_argument("--prompts", action="append", required=True, help="[SET=]FILE prompt set (repeatable)")
    ap.add_argument("--scorers", action="append", required=True, help="name=PATH,... (PATH: weights dir or URL)")
    ap.add_argument("--score-on", action="append", default=[], help="scorer=SET,... restrict a scorer to a set")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--out", required=True, help="output dir")
    ap.add_argument("--family", default="sd3", help="model family (engine/backends)")
    ap.add_argument("--encoder", default="", help="text encoder (default: the model dir)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=0, help="first N prompts of each set (0 = all)")
    ap.add_argument("--latent-size", type=int, default=0, help="latent side (SD3: pixels / 8; 0 = the model's)")
    ap.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (Flow-OPD: 128)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="", help="cuda, cpu (default: cuda when there is one)")
    args = ap.parse_args(argv)
    try:
        scorer_paths = parse_pairs(args.scorers, "--scorers")
        score_on = parse_pairs(args.score_on, "--score-on")
        prompts = load_sets(args.prompts, args.num_prompts)
    except ValueError as exc:
        ap.exit(2, f"error: {exc}\n")
    unknown = sorted(set(score_on) - set(scorer_paths))
    if unknown:
        ap.exit(2, f"error: --score-on names scorers not in --scorers: {unknown}\n")
    if args.samples < 1 or args.steps < 1 or args.batch < 1:
        ap.exit(2, "error: --samples, --steps and --batch must be >= 1\n")
    from engine.eval.scorers import ScorerError

    try:
        return run(args, scorer_paths, score_on, prompts)
    except ScorerError as exc:  # missing or corrupt scorer weights, an unknown scorer: named, before sampling
        ap.exit(2, f"error: {exc}\n")


def run(args: argparse.Namespace, scorer_paths: dict[str, str], score_on: dict[str, str],
        prompts: list[tuple[str, EvalPrompt]]) -> int:
    """Load, sample every row, score, write the table."""
    from engine.adapters.lora import load_adapter
    from engine.backends import get_backend
    from engine.config.io import resolve_path
    from engine.data.cache import load_or_build
    from engine.data.text import build_text_encoder
    from engine.eval.sampling import eval_noise, grid, make_decoder, sample_images, save_png
    from engine.eval.scorers import build_scorer
    from engine.eval.scoring import score_set
    from engine.eval.table import AVERAGE, card_average, write_table
    from engine.fields import Field, PeftFieldEvaluator

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    scorers = {n: build_scorer(n, p, device) for n, p in scorer_paths.items()}  # weights first: fail before sampling
    backend = get_backend(args.family)
    model_dir = resolve_path(args.model)
    model, spec = backend.load(model_dir, getattr(torch, args.dtype), args.latent_size)
    model = model.to(device).eval().requires_grad_(False)
    rows: list[tuple[str, str | None]] = [] if args.adapter and not args.with_base else [("base", None)]
    for i, path in enumerate(args.adapter):
        load_adapter(model, f"eval_{i}", path)
        rows.append((path, f"eval_{i}"))
    model.requires_grad_(False)
    encoder = build_text_encoder(args.encoder or str(model_dir), backend, spec, args.max_sequence_length,
                                 str(device))
    n = args.samples
    expanded = [p for _, p in prompts for _ in range(n)]
    emb = load_or_build(encoder, [p.text for p in expanded], out / "prompt_cache.safetensors", backend.cond_type)
    cond, uncond = emb.cond([p.text for p in expanded]), emb.uncond.to(device)
    noise = eval_noise(len(prompts), [args.seed], n, spec.latent_shape)
    decode = make_decoder(backend, model_dir, spec.latent_shape, device)
    sets = [s for s, _ in prompts for _ in range(n)]
    table: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for name, adapter in rows:
        field = Field("eval", adapter, args.cfg)
        evaluator = PeftFieldEvaluator(model, backend.velocity, [field], uncond)
        images = sample_images(lambda x, s, c, e=evaluator, f=field: e.field_velocity(f, x, s, c), cond, noise,
                               decode, args.steps, args.shift, args.batch, device)
        values, per_image = {}, {}
        for sname, scorer in scorers.items():
            keep = [i for i, s in enumerate(sets) if sname not in score_on or s == score_on[sname]]
            scored = score_set({sname: scorer}, images[keep], [expanded[i] for i in keep])
            values[sname] = scored.values[sname]
            counts[sname] = scored.counts[sname]
            per_image[sname] = dict(zip(keep, scored.per_image[sname].tolist()))
        avg = card_average(values)
        table[name] = {**values, **({AVERAGE: avg} if avg is not None else {})}
        shown = min(len(prompts), 8) * n
        save_png(grid(images[:shown], rows=min(len(prompts), 8)), out / "samples" / f"{slug(name)}.png",
                 max(1, 128 // images.shape[-1]))
        lines = [json.dumps({"prompt": p.text, "task": p.task, "sample": i % n,
                             **{s: _finite_or_none(per_image[s].get(i)) for s in scorers}})
                 for i, p in enumerate(expanded)]
        (out / "scores").mkdir(parents=True, exist_ok=True)
        (out / "scores" / f"{slug(name)}.jsonl").write_text("\n".join(lines) + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("scorers", "score_on")}
    text = write_table(out, table, list(scorers), {**settings, "scorers": scorer_paths, "score_on": score_on}, counts)
    print(text)
    print(f"table: {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
