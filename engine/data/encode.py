"""Encode a prompt set once into the prompt-embedding cache the trainer reads.

    python -m engine.data.encode --prompts data/train.jsonl --encoder /models/sd35m --out cache/train.safetensors
    # then train with --set data.cache=cache/train.safetensors

`--encoder` is a local SD3/SD3.5 pipeline dir (CLIP-L + CLIP-G + T5-XXL; no hub access), or `builtin`
(with `--preset`) / `toy`. The trainer builds the same cache automatically on first use; this step lets a
cluster job skip loading the ~10 GB of text encoders on every rank.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from engine.data.cache import load_or_build
from engine.data.encoders import SD3TextEncoder, build_encoder
from engine.data.prompts import load_prompts
from engine.models.presets import get_preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="builtin:<name>, .jsonl or .txt prompt set")
    ap.add_argument("--encoder", required=True, help="SD3 pipeline dir, builtin or toy")
    ap.add_argument("--out", required=True, help="cache file (.safetensors)")
    ap.add_argument("--preset", default="tiny", help="model preset for the builtin encoder")
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    prompts = load_prompts(args.prompts)
    if args.encoder in ("builtin", "toy"):
        encoder = build_encoder(args.encoder, get_preset(args.preset), args.max_sequence_length)
    else:
        encoder = SD3TextEncoder(args.encoder, args.max_sequence_length, args.device)
    t0 = time.perf_counter()
    emb = load_or_build(encoder, [p.text for p in prompts], args.out)
    print(f"{len(emb.prompts)} prompts (incl. the empty prompt) -> {args.out}: embeds {tuple(emb.embeds.shape)}, "
          f"pooled {tuple(emb.pooled.shape)}, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
