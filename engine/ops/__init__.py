"""TEMPORARY shim until the op table (branch house-ops) lands: the typed op entry points over engine.dispatch."""

from engine import dispatch
from engine.sampling.steps import (
    SDEStepOutput,
    cfg_combine,
    cfg_combine_ref,
    ode_step,
    ode_step_indexed,
    ode_step_ref,
    sde_noise_std,
    sde_step,
    sde_step_indexed,
    sde_step_ref,
)

BACKENDS = dispatch.BACKENDS
_SAMPLING = ("sde_step", "ode_step", "sde_step_indexed", "ode_step_indexed")


def problems(default: str, backends: dict) -> list[str]:
    p = []
    if default not in BACKENDS:
        p.append(f"kernels.default = {default!r}; valid: {', '.join(BACKENDS)}")
    for op, b in backends.items():
        if b not in BACKENDS:
            p.append(f"kernels.backends.{op} = {b!r}; valid: {', '.join(BACKENDS)}")
    return p


def configure(default: str = "auto", backends: dict | None = None) -> None:
    dispatch.set_backend("*", default)
    for op, b in (backends or {}).items():
        dispatch.set_backend(op, b)


__all__ = ["BACKENDS", "SDEStepOutput", "cfg_combine", "cfg_combine_ref", "configure", "ode_step", "ode_step_indexed",
           "ode_step_ref", "problems", "sde_noise_std", "sde_step", "sde_step_indexed", "sde_step_ref"]
