"""engine/dispatch.py: backend choice (config < FLOWOPD_BACKEND < FLOWOPD_BACKEND_<OP>), `auto`, and the single
log line of a fallback to the reference, on throwaway ops (the real ops' fallbacks are tested with their kernels).
"""

from __future__ import annotations

import logging

import pytest

import engine.adapters.multi_lora  # noqa: F401   the registry below)
import engine.backends.sd3.attention  # noqa: F401  (these imports register the real ops, before any fixture swaps
import engine.sampling.steps  # noqa: F401
from engine import dispatch

OP = "audit_op"
_REAL_REGISTRY = dispatch._REGISTRY


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    """A private registry/choice/warned state, and no FLOWOPD_BACKEND* from the caller's environment."""
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    monkeypatch.setattr(dispatch, "_CHOICE", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    for var in ("FLOWOPD_BACKEND", f"FLOWOPD_BACKEND_{OP.upper()}", "FLOWOPD_BACKEND_OTHER_OP"):
        monkeypatch.delenv(var, raising=False)


def _impl(name: str):
    return lambda: name


def _register(op: str = OP, triton: bool = True, cuda: bool = True) -> None:
    dispatch.register(op, "torch", _impl("torch"))
    dispatch.register(op, "triton", _impl("triton"), lambda: triton)
    dispatch.register(op, "cuda", _impl("cuda"), lambda: cuda)


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is not available here" in r.getMessage()]


def test_auto_prefers_cuda_then_triton_then_torch() -> None:
    _register(triton=True, cuda=True)
    assert dispatch.resolve(OP)() == "cuda"
    _register(triton=True, cuda=False)
    assert dispatch.resolve(OP)() == "triton"
    _register(triton=False, cuda=False)
    assert dispatch.resolve(OP)() == "torch"
    assert not dispatch._WARNED  # auto never warns: nothing was asked for that is missing


def test_precedence_config_then_global_env_then_op_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _register()
    dispatch.set_backend("*", "torch")
    assert dispatch.resolve(OP)() == "torch"
    dispatch.set_backend(OP, "triton")  # per-op config beats the '*' config
    assert dispatch.resolve(OP)() == "triton"
    monkeypatch.setenv("FLOWOPD_BACKEND", "cuda")  # the environment beats the config
    assert dispatch.resolve(OP)() == "cuda"
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", " Torch ")  # per-op env beats the global env; case/space
    assert dispatch.requested(OP) == "torch" and dispatch.resolve(OP)() == "torch"


def test_unavailable_backend_falls_back_with_one_log_line(monkeypatch, caplog) -> None:
    _register(triton=False, cuda=False)
    _register("other_op", triton=False, cuda=False)
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", "cuda")
    with caplog.at_level(logging.WARNING, logger="engine.dispatch"):
        for _ in range(3):
            assert dispatch.resolve(OP)() == "torch"
    assert len(_fallback_lines(caplog)) == 1 and "'cuda' for audit_op" in _fallback_lines(caplog)[0]
    monkeypatch.setenv("FLOWOPD_BACKEND_OTHER_OP", "triton")  # another op (or backend): its own single line
    with caplog.at_level(logging.WARNING, logger="engine.dispatch"):
        for _ in range(2):
            assert dispatch.resolve("other_op")() == "torch"
            assert dispatch.resolve(OP)() == "torch"
    assert len(_fallback_lines(caplog)) == 2


def test_backend_without_implementation_falls_back(monkeypatch, caplog) -> None:
    dispatch.register(OP, "torch", _impl("torch"))
    monkeypatch.setenv("FLOWOPD_BACKEND", "cuda")  # valid name, but this op has no cuda implementation
    with caplog.at_level(logging.WARNING, logger="engine.dispatch"):
        assert dispatch.resolve(OP)() == "torch"
    assert len(_fallback_lines(caplog)) == 1


def test_misspelt_env_value_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    _register()
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", "trition")
    with pytest.raises(ValueError, match="FLOWOPD_BACKEND_AUDIT_OP='trition' is not a backend"):
        dispatch.resolve(OP)
    monkeypatch.delenv(f"FLOWOPD_BACKEND_{OP.upper()}")
    monkeypatch.setenv("FLOWOPD_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FLOWOPD_BACKEND='gpu'"):
        dispatch.requested(OP)


def test_registration_and_choice_errors() -> None:
    with pytest.raises(ValueError, match="unknown backend 'auto'"):
        dispatch.register(OP, "auto", _impl("x"))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        dispatch.set_backend(OP, "fast")
    dispatch.register(OP, "triton", _impl("triton"))
    with pytest.raises(KeyError, match="no reference implementation"):
        dispatch.resolve(OP)
    assert dispatch.available_backends(OP) == ["triton"]


def test_every_engine_op_has_its_reference() -> None:
    """The ops the engine dispatches all register a torch reference (so a fallback always has a target)."""
    ops = {"sde_step", "ode_step", "cfg_combine", "sde_step_indexed", "ode_step_indexed", "lora_segmented",
           "qk_rmsnorm", "joint_attention"}  # fmt: skip
    assert ops <= set(_REAL_REGISTRY)
    assert all("torch" in _REAL_REGISTRY[op] for op in ops)
