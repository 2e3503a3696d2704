"""EMA of the student's LoRA weights (`train.ema_decay`, `train.ema_every`): Flow-GRPO's rule, as Flow-OPD runs it.

flow_grpo/ema.py `EMAModuleWrapper` (copied into Flow-OPD) keeps a copy of the trainable parameters; `step(params,
n)` with decay d_n = min((1 + n) / (10 + n), decay) does `ema += (1 - d_n) (p - ema)` when (n + 1) % interval == 0.
Flow-OPD builds it with decay 0.9 every 8 steps on its LoRA parameters (scripts/train_sd3_opd_mix.py:769-771) and
calls `ema.step(params, global_step)` after each rollout micro-batch's training (:1819-1820), where global_step
counts finished optimizer steps. With A micro-batches per optimizer step those are A calls between two updates,
all with the same weights and the same n (one right after the update that made n, A - 1 before the next), so
after finished step n the EMA moves A times: ema = p + d_n^A (ema - p). `StudentEMA.update(n)` does exactly that
with A = `train.ema_repeats` (Flow-OPD's 8-GPU config: A = 4, its 8 micro-batches of 4 images make 2 optimizer
steps per epoch; this engine's micro-batch holds whole prompt groups, so A is its own key; 1 = one move per step).
Eval and checkpoints use the EMA weights (`copy_ema_to` ... `copy_temp_to` around `eval` / `save_ckpt`, :441-542,
:556-560): here the export, the step callbacks (the world's reward curve) and the report (which measures the
export) do, through `applied()`.

The EMA is resume state: `state_dict()` rides in the checkpoint's client state, so a resumed run continues the same
average bit for bit. Memory: one float32 copy of the LoRA parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class StudentEMA:
    """The exponential moving average of the student's trainable parameters."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, every: int, repeats: int = 1):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.params = list(params)
        self.decay, self.every, self.repeats = decay, every, repeats
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_at(self, n: int) -> float:
        """Flow-GRPO's warm-up decay after n finished steps: min((1 + n) / (10 + n), decay)."""
        return min((1 + n) / (10 + n), self.decay)

    @torch.no_grad()
    def update(self, n: int) -> bool:
        """After finished optimizer step n: move the EMA toward the weights when (n + 1) % every == 0 (`repeats`
        times, as the reference's per-micro-batch calls do); True when it moved."""
        if (n + 1) % self.every:
            return False
        keep = self.decay_at(n) ** self.repeats
        for s, p in zip(self.shadow, self.params):
            s.mul_(keep).add_(p.detach().float(), alpha=1 - keep)
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the student's parameters inside the block, the trained ones restored after."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow):
                    p.copy_(s.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, saved):
                    p.copy_(t)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (CPU float32), for the checkpoint's client state."""
        return {"shadow": [s.cpu() for s in self.shadow], "decay": self.decay, "every": self.every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the parameter count and shapes must match."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the checkpoint's EMA does not match the student's parameters")
        self.shadow = [s.to(p.device, torch.float32).clone() for s, p in zip(shadow, self.params)]
