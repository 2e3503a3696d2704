"""Prompt-embedding cache: every distinct prompt (+ the empty prompt) encoded once, stored as safetensors.

The file holds one tensor per field of the model family's conditioning (SD3: `prompt_embeds` [N, L, D] and
`pooled` [N, P]; float32; row 0 = the unconditional "" prompt) and, as metadata, the prompt list and the encoder
identity. A cache whose metadata does not match the current prompts/encoder is rebuilt, never silently reused; a
corrupt file is reported by name and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.backends.base import TensorCond, TextEncoder

log = logging.getLogger(__name__)
UNCOND = ""


def prompts_digest(prompts: list[str]) -> str:
    """16 hex digits keying a prompt list (order matters)."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


class PromptEmbeddings:
    """Encoded prompts, indexable by prompt text; `uncond` is the empty prompt's conditioning."""

    def __init__(self, prompts: list[str], table: TensorCond):
        self.prompts = prompts
        self._index = {p: i for i, p in enumerate(prompts)}
        self.table = table
        """Every prompt's conditioning, row i = prompts[i]."""

    def cond(self, texts: list[str]) -> TensorCond:
        """The conditioning of `texts` (rows in that order)."""
        return self.table[torch.tensor([self._index[t] for t in texts])]

    @property
    def uncond(self) -> TensorCond:
        """The empty prompt's conditioning (batch 1)."""
        return self.cond([UNCOND])


def _encode_batched(encoder: TextEncoder, prompts: list[str], batch: int = 32) -> TensorCond:
    parts = [encoder.encode(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    return type(parts[0]).cat(parts)


def load_or_build(encoder: TextEncoder, prompts: list[str], path: str | Path | None,
                  cond_type: type[TensorCond]) -> PromptEmbeddings:
    """Embeddings of `prompts` (deduplicated, with "" first) from the cache at `path`, building it if needed;
    `cond_type` is the family's conditioning class (the cache's tensors are its fields)."""
    unique = [UNCOND] + sorted(set(prompts) - {UNCOND})
    digest = prompts_digest(unique)
    if path is not None:
        path = Path(path)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("digest") == digest and meta.get("encoder") == encoder.identity:
                        tensors = {k: f.get_tensor(k) for k in f.keys()}
                        return PromptEmbeddings(json.loads(meta["prompts"]), cond_type.from_tensors(tensors))
                log.info("prompt cache %s is for other prompts/encoder: rebuilding", path)
            except Exception as exc:  # corrupt/truncated file: say which, then rebuild
                log.warning("prompt cache %s is unreadable (%s): rebuilding", path, exc)
    cond = _encode_batched(encoder, unique)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in cond.tensors().items()}, str(tmp),
                  metadata={"digest": digest, "encoder": encoder.identity, "prompts": json.dumps(unique)})
        mask = os.umask(0)  # safetensors writes 0600; a `data.cache` shared between users needs the umask's mode
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)
        os.replace(tmp, path)
    return PromptEmbeddings(unique, cond)
