"""Prompt-embedding cache: every distinct prompt (+ the empty prompt) encoded once, stored as safetensors.

The file holds `prompt_embeds` [N, L, D] and `pooled` [N, P] (float32; row 0 = the unconditional "" prompt) and,
as metadata, the prompt list and the encoder identity. A cache whose metadata does not match the current
prompts/encoder is rebuilt, never silently reused; a corrupt file is reported by name and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.data.encoders import TextEncoder, prompts_digest
from engine.models.velocity import Cond

log = logging.getLogger(__name__)
UNCOND = ""


class PromptEmbeddings:
    """Encoded prompts, indexable by prompt index; `uncond` is the empty prompt's conditioning."""

    def __init__(self, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor):
        self.prompts = prompts
        self._index = {p: i for i, p in enumerate(prompts)}
        self.embeds, self.pooled = embeds, pooled

    def cond(self, texts: list[str]) -> Cond:
        idx = torch.tensor([self._index[t] for t in texts])
        return Cond(self.embeds[idx], self.pooled[idx])

    @property
    def uncond(self) -> Cond:
        return self.cond([UNCOND])


def _encode_batched(encoder: TextEncoder, prompts: list[str], batch: int = 32) -> Cond:
    parts = [encoder.encode(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    return Cond.cat(parts)


def load_or_build(encoder: TextEncoder, prompts: list[str], path: str | Path | None) -> PromptEmbeddings:
    """Embeddings of `prompts` (deduplicated, with "" first) from the cache at `path`, building it if needed."""
    unique = [UNCOND] + sorted(set(prompts) - {UNCOND})
    digest = prompts_digest(unique)
    if path is not None:
        path = Path(path)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("digest") == digest and meta.get("encoder") == encoder.identity:
                        return PromptEmbeddings(json.loads(meta["prompts"]), f.get_tensor("prompt_embeds"),
                                                f.get_tensor("pooled"))
                log.info("prompt cache %s is for other prompts/encoder: rebuilding", path)
            except Exception as exc:  # corrupt/truncated file: say which, then rebuild
                log.warning("prompt cache %s is unreadable (%s): rebuilding", path, exc)
    cond = _encode_batched(encoder, unique)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"prompt_embeds": cond.prompt_embeds.contiguous(), "pooled": cond.pooled.contiguous()},
                  str(tmp), metadata={"digest": digest, "encoder": encoder.identity, "prompts": json.dumps(unique)})
        mask = os.umask(0)  # safetensors writes 0600; a `data.cache` shared between users needs the umask's mode
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)
        os.replace(tmp, path)
    return PromptEmbeddings(unique, cond.prompt_embeds, cond.pooled)
