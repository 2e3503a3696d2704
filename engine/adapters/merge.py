"""Cold start: fold the teachers' LoRAs into the student before OPD.

Two methods:
- `average`: the Flow-OPD reference code averages lora_A and lora_B separately across teachers (same
  rank required; normalised weights apply to both). Cheap, but B_avg A_avg != mean(B_i A_i): cross terms
  B_i A_j leak in.
- `svd`: the exact weighted sum of the teachers' deltas dW = sum_i w_i s_i B_i A_i (s_i = alpha_i/r_i),
  re-factored to the student's rank by truncated SVD, the best rank-r approximation (Eckart-Young).
  Weights default to 1/K (the mean delta); weights of 1 give the plain sum (task arithmetic).

A student layer that no merged teacher targets (e.g. `attn2.*` of SD3.5-M's dual-attention blocks when the
Flow-GRPO experts target `attn.*` only: 52 of 243 layers) keeps the student's own init (A drawn, B = 0), so it
trains; zeroing both A and B there, as a plain copy of the merge would, leaves the gradient of A (through B = 0)
and of B (through A = 0) zero forever. `merge_into_student` returns how many layers kept their init. Likewise the
`svd` merge fills only the delta's rank and leaves the remaining rank directions at the student's init.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.adapters.lora import STUDENT, adapter_scale, lora_layers

MERGE_METHODS = ("average", "svd")


def _weights(names: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / len(names)] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} merge weights for {len(names)} teachers")
    return [float(w) for w in weights]


@torch.no_grad()
def merge_into_student(
    model: torch.nn.Module,
    teachers: Sequence[str],
    method: str = "svd",
    weights: Sequence[float] | None = None,
    student: str = STUDENT,
) -> int:
    """Overwrite the student adapter with the merge of `teachers` in every layer some teacher targets (in place);
    returns the number of student layers no teacher covers, which keep their init."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {MERGE_METHODS}")
    if not teachers:
        raise ValueError("merge needs at least one teacher")
    w = _weights(teachers, weights)
    s_student = adapter_scale(model, student)
    scales = [adapter_scale(model, t) for t in teachers]
    uncovered = 0
    for layer in lora_layers(model):
        if student not in layer.lora_A:
            continue
        a_s, b_s = layer.lora_A[student].weight, layer.lora_B[student].weight
        rank = a_s.shape[0]
        present = [(t, wi, si) for t, wi, si in zip(teachers, w, scales) if t in layer.lora_A]
        if not present:
            uncovered += 1
            continue
        if method == "average":
            total = sum(wi for _, wi, _ in present)
            a = sum(wi / total * layer.lora_A[t].weight.double() for t, wi, _ in present)
            b = sum(wi / total * layer.lora_B[t].weight.double() for t, wi, _ in present)
            if a.shape != a_s.shape:
                raise ValueError(f"`average` merge needs teacher rank == student rank ({a.shape} vs {a_s.shape})")
            # the teachers' (weighted mean) scale alpha/r is kept by folding s_teacher / s_student into B
            scale = sum(wi / total * si for _, wi, si in present) / s_student
            a_s.copy_(a.to(a_s.dtype))
            b_s.copy_((b * scale).to(b_s.dtype))
            continue
        delta = sum(
            wi * si * layer.lora_B[t].weight.double() @ layer.lora_A[t].weight.double() for t, wi, si in present
        )
        u, sv, vh = torch.linalg.svd(delta / s_student, full_matrices=False)
        # rank directions the merge does not fill (the delta's rank < the student's: 3 rank-8 teachers into rank
        # 32 leave 8) keep the student's init row of A with B = 0: the same delta, but trainable
        k = int((sv[: min(rank, sv.shape[0])] > sv[0] * 1e-12).sum()) if sv.numel() and sv[0] > 0 else 0
        root = sv[:k].sqrt()
        new_b = torch.zeros_like(b_s, dtype=torch.float64)
        new_a = a_s.detach().double().clone()
        new_b[:, :k] = u[:, :k] * root
        new_a[:k] = root[:, None] * vh[:k]
        a_s.copy_(new_a.to(a_s.dtype))
        b_s.copy_(new_b.to(b_s.dtype))
    return uncovered
