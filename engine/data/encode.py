"""Encode a prompt set once into the prompt-embedding cache the trainer reads.

    python -m engine.data.encode --prompts data/train.jsonl --encoder /models/sd35m --out cache/train.safetensors \
        --dtype bfloat16
    # then train with --set data.cache=cache/train.safetensors

`--encoder` is a local pipeline dir of the model family (`--family`, default sd3: CLIP-L + CLIP-G + T5-XXL; no hub
access), `builtin` (with `--preset`), or a miniature world's name (e.g. `toy`). The trainer builds the same cache
automatically on first use; this step lets a cluster job skip loading the ~10 GB of text encoders on every rank.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from engine.backends import get_backend
from engine.data.cache import load_or_build
from engine.data.prompts import load_prompts
from engine.data.text import build_text_encoder


def main(argv: list[str] | None = None) -> int:
    """Build (or verify) the cache of `--prompts` encoded by `--encoder` at `--out`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="builtin:<name>, .jsonl or .txt prompt set")
    ap.add_argument("--encoder", required=True, help="pipeline dir of the family, builtin, or a world's name")
    ap.add_argument("--out", required=True, help="cache file (.safetensors)")
    ap.add_argument("--family", default="sd3", help="model family (engine/backends)")
    ap.add_argument("--preset", default="tiny", help="model preset for the builtin encoder")
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="stored dtype: float32 serves every run; bfloat16 halves the file for bfloat16 runs")
    args = ap.parse_args(argv)
    prompts = load_prompts(args.prompts)
    backend = get_backend(args.family)
    encoder = build_text_encoder(args.encoder, backend, backend.preset_spec(args.preset), args.max_sequence_length,
                                 args.device)
    t0 = time.perf_counter()
    emb = load_or_build(encoder, [p.text for p in prompts], args.out, backend.cond_type, getattr(torch, args.dtype))
    shapes = ", ".join(f"{k} {shape}" for k, shape in emb.shapes.items())
    print(f"{len(emb.prompts)} prompts (incl. the empty prompt) -> {args.out}: {shapes}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
