"""The toy world's text encoder, trained jointly with the base transformer.

Word-level over the world's closed vocabulary (`world.VOCAB`; a number is split into one token per digit): token +
position embeddings -> LayerNorm gives `prompt_embeds` [B, seq_len, dim]; the pooled vector is an MLP of the
mean token embedding (zeros for the empty prompt ""). No dropout, float32, so `encode` is deterministic.
Unknown words map to `[unk]`; the unconditional prompt is "" (all `[pad]`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.backends.sd3.cond import SD3Cond
from engine.worlds.toy.world import VOCAB

PAD, UNK = "[pad]", "[unk]"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ToyTextEncoder(nn.Module):
    """The world's word-level text encoder (see the module docstring)."""
    def __init__(
        self, vocab: Sequence[str] = VOCAB, seq_len: int = 12, dim: int = 64, pooled_dim: int = 64
    ) -> None:
        super().__init__()
        self.vocab = (PAD, UNK, *vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.seq_len, self.dim, self.pooled_dim = seq_len, dim, pooled_dim
        self.tok = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, pooled_dim))
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos, std=0.1)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, seq_len] token ids; words beyond seq_len are dropped (the world's prompts have <= 10)."""
        ids = torch.zeros(len(prompts), self.seq_len, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = [w for word in p.lower().split() for w in (word if word.isdigit() else [word])][: self.seq_len]
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def forward(self, ids: torch.Tensor) -> SD3Cond:
        """SD3Cond of token ids [B, seq_len]."""
        emb = self.tok(ids)
        real = (ids != 0).unsqueeze(-1).to(emb.dtype)
        mean = (emb * real).sum(1) / real.sum(1).clamp_min(1.0)
        return SD3Cond(self.norm(emb + self.pos), self.pool(mean))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> SD3Cond:
        """Conditioning of `prompts` (float32, CPU; "" is the unconditional prompt)."""
        was = self.training
        self.eval()
        try:
            cond = self(self.tokenize(list(prompts)).to(self.pos.device))
        finally:
            self.train(was)
        return cond.to("cpu", torch.float32)

    def config(self) -> dict:
        """The constructor arguments (config.json)."""
        return dict(vocab=list(self.vocab[2:]), seq_len=self.seq_len, dim=self.dim, pooled_dim=self.pooled_dim)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write config.json, model.safetensors and SHA256SUMS into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1))
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME))
        from engine.files import write_sha256sums

        write_sha256sums(out_dir, [CONFIG_NAME, WEIGHTS_NAME])
        return out_dir

    @property
    def identity(self) -> str:
        """Keys the prompt-embedding cache: changes whenever the weights (and so the outputs) do."""
        if not hasattr(self, "_identity"):
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().float().numpy().tobytes())
            self._identity = f"toy:{self.seq_len}:{self.dim}:{h.hexdigest()[:16]}"
        return self._identity

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> ToyTextEncoder:
        """Load a saved encoder (default: the shipped one, engine/toy/weights/encoder)."""
        from engine.files import verify_sha256sums

        path = Path(path) if path is not None else Path(__file__).resolve().parent / "weights" / "encoder"
        if bad := verify_sha256sums(path):
            raise ValueError("; ".join(bad))
        try:
            enc = cls(**json.loads((path / CONFIG_NAME).read_text()))
            enc.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        except Exception as exc:  # missing/truncated/edited files raise OSError, SafetensorError, RuntimeError ...
            raise ValueError(f"cannot load the toy text encoder from {path / CONFIG_NAME} + {path / WEIGHTS_NAME}: "
                             f"{exc}") from exc
        enc.requires_grad_(False)
        return enc.eval()
