"""The gradient diagnostic (`opd.grad_diagnostic`): which part of a loss's gradient trains the student.

Every loss splits its objective into a pathwise part (the gradient flows through the distance to the field: the
MSE, the transition KL, the anchor) and a score-function part (the gradient flows through log p of the sampled
transition: the ratio of kl_only and rkl_pg) (engine/opd/losses.py `LossTerms.pathwise/score`). On a diagnostic
step the objective takes `torch.autograd.grad` of each part separately on the student's LoRA parameters, before
the chunk's backward, and logs their norms and cosine: grad/pathwise, grad/score, grad/cos (0 when a part is
absent). Cost: up to two extra backward passes through the student's graph per query chunk, on those steps only
(the graph is kept for the real backward with retain_graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _flat_grad(part: torch.Tensor | None, params: Sequence[torch.nn.Parameter]) -> torch.Tensor | None:
    if part is None or not part.requires_grad:
        return None
    grads = torch.autograd.grad(part, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(grads, params)])


def gradient_parts(pathwise: torch.Tensor | None, score: torch.Tensor | None,
                   params: Sequence[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """{grad/pathwise, grad/score, grad/cos}: the norms of the two parts' gradients on `params` and their cosine
    (0 when either part is absent or zero), as detached float32 scalars."""
    if not params:
        raise ValueError("the gradient diagnostic needs the student's trainable parameters")
    gp, gs = _flat_grad(pathwise, params), _flat_grad(score, params)
    device = params[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    n_p = gp.norm() if gp is not None else zero
    n_s = gs.norm() if gs is not None else zero
    cos = (gp @ gs) / (n_p * n_s) if gp is not None and gs is not None and n_p > 0 and n_s > 0 else zero
    return {"grad/pathwise": n_p.float(), "grad/score": n_s.float(), "grad/cos": cos.float()}
