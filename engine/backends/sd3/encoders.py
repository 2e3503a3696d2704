"""SD3 text encoders: prompts -> `SD3Cond` (engine.backends.base.TextEncoder).

The trainer never runs a text encoder in its hot loop: prompts are encoded once into the embedding cache.
- `HashTextEncoder`: the `tiny` preset's built-in, deterministic, weight-free encoder (token hash -> fixed
  random table), so everything runs without downloads.
- `SD3TextEncoder`: the real CLIP-L + CLIP-G + T5-XXL stack of a local SD3/SD3.5 pipeline dir, via diffusers'
  `StableDiffusion3Pipeline.encode_prompt` (77 CLIP + `max_sequence_length` T5 tokens, 4096-d; pooled 2048-d).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from engine.backends.sd3.cond import SD3Cond


class HashTextEncoder:
    """Deterministic stand-in encoder: token i -> row crc32(token) % vocab of a seeded N(0, 1) table."""

    def __init__(self, seq_len: int, dim: int, pooled_dim: int, vocab: int = 4096, seed: int = 1234):
        self.seq_len, self.dim, self.pooled_dim, self.vocab, self.seed = seq_len, dim, pooled_dim, vocab, seed
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, dim, generator=gen)
        self.positions = 0.1 * torch.randn(seq_len, dim, generator=gen)
        self.pool = torch.randn(dim, pooled_dim, generator=gen) / dim**0.5

    @property
    def identity(self) -> str:
        """Keys the prompt cache: the table's shape and seed."""
        return f"hash:{self.seq_len}:{self.dim}:{self.pooled_dim}:{self.vocab}:{self.seed}"

    def encode(self, prompts: list[str]) -> SD3Cond:
        """Conditioning of `prompts`; the empty prompt is all zeros."""
        embeds = torch.zeros(len(prompts), self.seq_len, self.dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for i, text in enumerate(prompts):
            tokens = text.lower().split()[: self.seq_len]
            if not tokens:
                continue  # the empty (unconditional) prompt is all zeros
            ids = torch.tensor([zlib.crc32(t.encode()) % self.vocab for t in tokens])
            rows = self.table[ids] + self.positions[: len(tokens)]
            embeds[i, : len(tokens)] = rows
            pooled[i] = rows.mean(0) @ self.pool
        return SD3Cond(embeds, pooled)


class SD3TextEncoder:
    """The SD3 text encoders of a local pipeline dir (no hub access: `local_files_only`).

    Lazy: the ~10 GB of encoders load on the first `encode`, so a run whose prompt cache is already built
    (`python -m engine.data.encode`) never loads them. Dims come from the encoders' config.json files.
    """

    def __init__(self, pipeline_dir: str | Path, max_sequence_length: int = 256, device: str | None = None,
                 dtype: torch.dtype | None = None):
        path = Path(pipeline_dir)
        for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"SD3 pipeline dir {path} has no {sub}/ (needed by the text encoders)")
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        self.max_sequence_length = max_sequence_length
        self.seq_len = 77 + max_sequence_length
        self.dim = int(_read_json(path / "text_encoder_3" / "config.json")["d_model"])
        self.pooled_dim = sum(int(_read_json(path / sub / "config.json")["projection_dim"])
                              for sub in ("text_encoder", "text_encoder_2"))
        self.pipe = None

    @property
    def identity(self) -> str:
        """Keys the prompt cache: the pipeline dir and the T5 length."""
        # dtype is left out on purpose: a cache built in bf16 on a GPU node serves fp32 runs too
        return f"sd3:{self.path.resolve()}:{self.max_sequence_length}"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> SD3Cond:
        """Conditioning of `prompts` through the pipeline's own `encode_prompt` (float32, CPU)."""
        if self.pipe is None:
            from diffusers import StableDiffusion3Pipeline

            self.pipe = StableDiffusion3Pipeline.from_pretrained(
                str(self.path), transformer=None, vae=None, torch_dtype=self.dtype, local_files_only=True,
                use_safetensors=True,  # no pickled .bin weights: nothing loaded may run code
            ).to(self.device)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return SD3Cond(embeds.float().cpu(), pooled.float().cpu())


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read {path}: {exc}") from exc
