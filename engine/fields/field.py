"""A capability field: a velocity field the student is distilled from (DESIGN §1).

A field is a source (a LoRA adapter on the shared base, or the base itself with adapters disabled) plus an
operator that combines the source's conditional and unconditional velocities: `cfg`, classifier-free guidance
v_F = v_u + g (v_c - v_u) with g = `cfg_scale` (g = 1: the plain conditional velocity, one forward). Expert
teachers, DanceOPD's CFG-absorption field (base, g = alpha), the MAR anchor (base or a quality teacher) and the
student itself are all fields. A new operator (a field type) is one function registered with `register_operator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

STUDENT = "student"

Operator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(v_uncond, v_cond, scale) -> the field's velocity (called only when the field is guided, scale != 1)."""


def _cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    from engine.ops import cfg_combine

    return cfg_combine(v_uncond, v_cond, scale)


OPERATORS: dict[str, Operator] = {"cfg": _cfg}


def register_operator(name: str, fn: Operator) -> None:
    """Make `fn` selectable as a field's `operator` (`[[fields]] operator = name`)."""
    OPERATORS[name] = fn


def get_operator(name: str) -> Operator:
    """The operator called `name`; KeyError listing the valid names."""
    if name not in OPERATORS:
        raise KeyError(f"unknown field operator {name!r}; valid: {', '.join(OPERATORS)}")
    return OPERATORS[name]


@dataclass(frozen=True)
class Field:
    """A velocity field: an adapter (or the base) and its CFG scale."""
    name: str
    adapter: str | None
    """peft adapter name, or None for the base model (all adapters disabled)."""
    cfg_scale: float = 1.0
    """Guidance scale g of the field's operator; 1.0 = unguided (no unconditional forward)."""
    operator: str = "cfg"
    """How the conditional and unconditional velocities combine when guided (OPERATORS)."""

    @property
    def guided(self) -> bool:
        """True when the field needs an unconditional twin row (g != 1)."""
        return self.cfg_scale != 1.0


def student_field(cfg_scale: float = 1.0) -> Field:
    """The student adapter as a field, guided by `cfg_scale` (its rollout or its side of the loss)."""
    return Field(name=STUDENT, adapter=STUDENT, cfg_scale=cfg_scale)
