"""engine/ops: the op table. Backend choice (config < FLOWOPD_BACKEND < FLOWOPD_BACKEND_<OP>), `auto`, the one
availability rule, one warning per unavailable (op, backend), `accepts` fall-through cuda -> triton -> torch, the
config checks; first on throwaway ops on a pretend machine, then on the real ops on this one (CPU: Triton only in
the interpreter, which `auto` never picks). The kernels' numerics are tested with the kernels.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
import torch

from engine import ops
from engine.ops import registry
from engine.ops.registry import Impl, Op

OP, OTHER = "audit_op", "other_op"
REPO = Path(__file__).resolve().parents[1]
SIG = torch.linspace(1.0, 0.0, 11)


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    """Private choice/warned state, and no FLOWOPD_BACKEND* from the caller's environment."""
    monkeypatch.setattr(registry, "_DEFAULT", "auto")
    monkeypatch.setattr(registry, "_CHOICE", {})
    monkeypatch.setattr(registry, "_WARNED", set())
    for var in [v for v in os.environ if v.startswith("FLOWOPD_BACKEND")]:
        monkeypatch.delenv(var)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty private op table."""
    monkeypatch.setattr(registry, "_OPS", {})


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """A pretend machine: which kernel backends `available` reports (mutate the dict to change it)."""
    have = {"cuda": True, "triton": True}
    monkeypatch.setattr(registry, "available", lambda backend, *, explicit=False: backend == "torch" or have[backend])
    return have


def _named(name: str):
    return lambda: name


def _register(name: str = OP) -> None:
    registry.register(Op(name, _named("torch"), {"triton": Impl(_named("triton")), "cuda": Impl(_named("cuda"))}))


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is not available here" in r.getMessage()]


# --------------------------------------------------------------------------------------------- the table


def test_auto_prefers_cuda_then_triton_then_torch(table, machine) -> None:
    _register()
    assert ops.resolve(OP)() == "cuda"
    machine["cuda"] = False
    assert ops.resolve(OP)() == "triton" and ops.chosen(OP) == "triton"
    machine["triton"] = False
    assert ops.resolve(OP)() == "torch"
    assert not registry._WARNED  # auto never warns: nothing was asked for that is missing


def test_precedence_config_then_global_env_then_op_env(table, machine, monkeypatch) -> None:
    _register()
    ops.configure(default="torch")
    assert ops.resolve(OP)() == "torch"
    ops.configure(default="torch", backends={OP: "triton"})  # per-op config beats the default
    assert ops.resolve(OP)() == "triton"
    monkeypatch.setenv("FLOWOPD_BACKEND", "cuda")  # the environment beats the config
    assert ops.resolve(OP)() == "cuda"
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", " Torch ")  # per-op env beats the global env; case/space
    assert ops.requested(OP) == "torch" and ops.resolve(OP)() == "torch"
    ops.configure()  # configure replaces: back to auto everywhere
    monkeypatch.delenv("FLOWOPD_BACKEND")
    monkeypatch.delenv(f"FLOWOPD_BACKEND_{OP.upper()}")
    assert ops.requested(OP) == "auto"


def test_unavailable_backend_falls_back_with_one_log_line(table, machine, monkeypatch, caplog) -> None:
    machine.update(cuda=False, triton=False)
    _register()
    _register(OTHER)
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", "cuda")
    with caplog.at_level(logging.WARNING, logger="engine.ops.registry"):
        for _ in range(3):
            assert ops.resolve(OP)() == "torch"
    assert len(_fallback_lines(caplog)) == 1 and "'cuda' for audit_op" in _fallback_lines(caplog)[0]
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OTHER.upper()}", "triton")  # another op (or backend): its own line
    with caplog.at_level(logging.WARNING, logger="engine.ops.registry"):
        for _ in range(2):
            assert ops.resolve(OTHER)() == "torch"
            assert ops.chosen(OP) == "torch"
    assert len(_fallback_lines(caplog)) == 2


def test_backend_without_implementation_falls_back(table, machine, monkeypatch, caplog) -> None:
    registry.register(Op(OP, _named("torch")))
    monkeypatch.setenv("FLOWOPD_BACKEND", "cuda")  # valid name, but this op has no cuda kernel
    with caplog.at_level(logging.WARNING, logger="engine.ops.registry"):
        assert ops.resolve(OP)() == "torch"
    assert len(_fallback_lines(caplog)) == 1
    assert ops.available_backends(OP) == ["torch"]


def test_misspelt_env_value_is_an_error_naming_the_variable(table, machine, monkeypatch) -> None:
    _register()
    monkeypatch.setenv(f"FLOWOPD_BACKEND_{OP.upper()}", "trition")
    with pytest.raises(ValueError, match="FLOWOPD_BACKEND_AUDIT_OP='trition' is not a backend"):
        ops.resolve(OP)
    monkeypatch.delenv(f"FLOWOPD_BACKEND_{OP.upper()}")
    monkeypatch.setenv("FLOWOPD_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FLOWOPD_BACKEND='gpu'"):
        ops.requested(OP)


def test_accepts_falls_through_cuda_triton_torch_silently(table, machine, monkeypatch, caplog) -> None:
    registry.register(Op(OP, lambda n: "torch", {"cuda": Impl(lambda n: "cuda", lambda n: n > 2),
                                                 "triton": Impl(lambda n: "triton", lambda n: n > 1)}))
    with caplog.at_level(logging.DEBUG):
        assert [ops.resolve(OP)(n) for n in (3, 2, 0)] == ["cuda", "triton", "torch"]
        assert [ops.chosen(OP, n) for n in (3, 2, 0)] == ["cuda", "triton", "torch"]
        monkeypatch.setenv("FLOWOPD_BACKEND", "triton")  # a triton request never tries cuda
        assert [ops.resolve(OP)(n) for n in (3, 2, 0)] == ["triton", "triton", "torch"]
        machine["triton"] = False  # cuda requested, the triton fall-through unavailable: straight to torch
        monkeypatch.setenv("FLOWOPD_BACKEND", "cuda")
        assert [ops.resolve(OP)(n) for n in (3, 2)] == ["cuda", "torch"]
    assert not caplog.records


def test_registration_and_config_errors(table) -> None:
    with pytest.raises(ValueError, match="unknown backend 'auto'"):
        Op(OP, _named("torch"), {"auto": Impl(_named("x"))})
    with pytest.raises(ValueError, match="unknown backend 'torch'.*the reference is the torch backend"):
        Op(OP, _named("torch"), {"torch": Impl(_named("x"))})
    _register()
    _register(OTHER)
    assert ops.ops() == [OP, OTHER]
    with pytest.raises(KeyError, match="no op 'nope' in the table; registered: audit_op, other_op"):
        ops.resolve("nope")
    ops.configure("torch", {OP: "triton"})
    with pytest.raises(ValueError, match="kernels.default = 'fast'; valid: auto, torch, triton, cuda"):
        ops.configure(default="fast")
    assert ops.requested(OP) == "triton" and ops.requested(OTHER) == "torch"  # a refused configure changes nothing


def test_problems_lists_every_unknown_op_and_backend(table) -> None:
    _register()
    _register(OTHER)
    assert ops.problems("auto", {OP: "cuda", OTHER: "torch"}) == []
    assert ops.problems("auto", None) == []
    assert ops.problems("fast", {"sde_stepp": "torch", OP: "gpu", "typo": "trition"}) == [
        "kernels.default = 'fast'; valid: auto, torch, triton, cuda",
        "kernels.backends: unknown op 'sde_stepp'; valid: audit_op, other_op",
        "kernels.backends.audit_op = 'gpu'; valid: auto, torch, triton, cuda",
        "kernels.backends: unknown op 'typo'; valid: audit_op, other_op",
        "kernels.backends.typo = 'trition'; valid: auto, torch, triton, cuda",
    ]
    with pytest.raises(ValueError, match="unknown op 'sde_stepp'.*; kernels.backends.audit_op = 'gpu'"):
        ops.configure("auto", {"sde_stepp": "torch", OP: "gpu"})


def test_the_availability_rule(monkeypatch) -> None:
    from kernels import native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.available("torch") and not ops.available("cuda") and not ops.available("cuda", explicit=True)
    assert not ops.available("triton")  # auto never picks the interpreter
    assert ops.available("triton", explicit=True)  # asked for by name: it may
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.available("triton", explicit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, native ops not built ...
    monkeypatch.setattr(native, "native_available", lambda: False)
    assert ops.available("triton") and not ops.available("cuda")
    monkeypatch.setattr(native, "native_available", lambda: True)  # ... and built
    assert ops.available("cuda")
    monkeypatch.setattr(registry, "triton_importable", lambda: False)  # cuda shares Triton's backwards
    assert not ops.available("cuda") and not ops.available("triton", explicit=True)
    with pytest.raises(ValueError, match="unknown backend 'auto'"):
        ops.available("auto")


# --------------------------------------------------------------------------------------------- the real ops

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-machine behaviour (interpreter, no GPU)")


def test_every_engine_op_has_its_reference_and_kernels() -> None:
    want = {"sde_step": {"cuda", "triton"}, "ode_step": {"cuda", "triton"}, "sde_step_indexed": {"cuda", "triton"},
            "ode_step_indexed": {"cuda", "triton"}, "cfg_combine": {"triton"}, "lora_segmented": {"triton"},
            "qk_rmsnorm": {"triton"}}  # fmt: skip
    assert set(want) <= set(ops.ops())
    for name, kernels in want.items():
        op = registry._OPS[name]
        assert callable(op.ref) and set(op.impls) == kernels, name


def _sde_inputs():
    x = torch.randn(2, 3, 5, 7)
    return x, torch.randn_like(x), torch.randn_like(x)


@cpu_only
def test_auto_never_picks_the_interpreter_and_explicit_triton_runs_the_kernel(monkeypatch) -> None:
    from kernels import sde_step as sde_k

    calls = []
    real = sde_k._launch_fwd
    monkeypatch.setattr(sde_k, "_launch_fwd", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x, v, eps = _sde_inputs()
    args = (x, v, SIG[2], SIG[3], SIG[1], 0.7, eps)
    want = ops.sde_step_ref(*args)
    assert os.environ.get("TRITON_INTERPRET") == "1" and ops.available_backends("sde_step") == ["torch"]
    assert ops.chosen("sde_step", *args) == "torch"
    got = ops.sde_step(*args)
    assert not calls and torch.equal(got.sample, want.sample) and torch.equal(got.log_prob, want.log_prob)
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "triton")
    assert ops.available_backends("sde_step") == ["triton", "torch"]
    assert ops.chosen("sde_step", *args) == "triton"
    got = ops.sde_step(*args)
    assert calls == ["triton"]
    torch.testing.assert_close(got.sample, want.sample, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.log_prob, want.log_prob, atol=1e-6, rtol=1e-6)


@cpu_only
def test_lora_and_qk_rmsnorm_follow_the_same_rule(monkeypatch) -> None:
    x, w, bias = torch.randn(3, 2, 16), torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    meta = (torch.tensor([1.0, 0.5]), torch.tensor([0, 1, 3], dtype=torch.int32),
            torch.tensor([1, 0], dtype=torch.int32))
    ys = [torch.randn(2, 3, 3 * 2 * 8)]
    qk = (ys, [None], [None], [True], [True], 2, 1e-6)
    assert ops.chosen("lora_segmented", x, w, bias, a, b, *meta) == "torch"  # auto on CPU: the bmm fallback
    assert ops.chosen("qk_rmsnorm", *qk) == "torch"
    want_y, want_q = ops.lora_segmented(x, w, bias, a, b, *meta), ops.qk_rmsnorm(*qk)
    monkeypatch.setenv("FLOWOPD_BACKEND", "triton")
    assert ops.chosen("lora_segmented", x, w, bias, a, b, *meta) == "triton"
    assert ops.chosen("qk_rmsnorm", *qk) == "triton"
    torch.testing.assert_close(ops.lora_segmented(x, w, bias, a, b, *meta), want_y, atol=1e-5, rtol=1e-5)
    for got, want in zip(ops.qk_rmsnorm(*qk), want_q):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@cpu_only
def test_inputs_a_kernel_cannot_take_run_the_reference(monkeypatch, caplog) -> None:
    monkeypatch.setenv("FLOWOPD_BACKEND", "triton")
    x, v, eps = _sde_inputs()
    xd, vd, ed = x.double(), v.double(), eps.double()
    with caplog.at_level(logging.DEBUG, logger="engine.ops.registry"):
        assert ops.chosen("sde_step", xd, vd, SIG[2], SIG[3], SIG[1], 0.7, ed) == "torch"  # float64
        got = ops.sde_step(xd, vd, SIG[2], SIG[3], SIG[1], 0.7, ed)
        want = ops.sde_step_ref(xd, vd, SIG[2], SIG[3], SIG[1], 0.7, ed)
        assert torch.equal(got.sample, want.sample) and torch.equal(got.log_prob, want.log_prob)
        assert ops.chosen("sde_step", x, v, SIG[2], SIG[3], SIG[1], 0.7, eps, compute_dtype=torch.float64) == "torch"
        assert ops.chosen("sde_step", x, v, SIG[2], SIG[3], SIG[1], 0.7, eps.clone().requires_grad_()) == "torch"
        assert ops.chosen("sde_step", x, v, SIG[2].clone().requires_grad_(), SIG[3], SIG[1], 0.7, eps) == "torch"
        assert ops.chosen("ode_step", xd, vd, 0.5, 0.4) == "torch"
        assert ops.chosen("cfg_combine", v, eps, torch.tensor(2.0)) == "torch"  # a tensor guidance scale
        assert ops.chosen("cfg_combine", v, eps[:1], 2.0) == "torch"  # shapes differ (the reference broadcasts)
        step = torch.tensor([1, 3])
        assert ops.chosen("sde_step_indexed", x, v, SIG, step, 0.7) == "triton"
        assert ops.chosen("sde_step_indexed", x, v, SIG.double(), step, 0.7) == "torch"  # float64 table
        assert ops.chosen("sde_step_indexed", x, v, SIG, step.float(), 0.7) == "torch"  # float steps
        assert ops.chosen("ode_step_indexed", x, v, SIG.clone().requires_grad_(), step) == "torch"
        assert ops.chosen("ode_step_indexed", x, None, SIG, step, v_uncond=v, v_cond=eps.half()) == "triton"
    assert not caplog.records  # a fall-through for the inputs is silent


@cpu_only
def test_explicit_backend_unavailable_here_warns_once(monkeypatch, caplog) -> None:
    from kernels.native import native_available

    x, v, eps = _sde_inputs()
    args = (x, v, SIG[2], SIG[3], SIG[1], 0.7, eps)
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "cuda")
    with caplog.at_level(logging.INFO):
        assert ops.chosen("sde_step", *args) == "torch" and ops.chosen("sde_step", *args) == "torch"
        assert not native_available()
    assert "cuda" not in ops.available_backends("sde_step")
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: unavailable
    with caplog.at_level(logging.INFO):
        torch.testing.assert_close(ops.sde_step(*args).sample, ops.sde_step_ref(*args).sample, atol=0, rtol=0)
        ops.sde_step(*args)
    lines = _fallback_lines(caplog)
    assert lines == ["flowopd: backend 'cuda' for sde_step is not available here, using the torch reference",
                     "flowopd: backend 'triton' for sde_step is not available here, using the torch reference"]


def test_engine_ops_imports_only_itself_and_kernels_runtime_at_import() -> None:
    """engine/ops sits just above kernels/: no other engine module anywhere in it, and at module level no kernel
    module but kernels.runtime (TRITON_INTERPRET is read when a kernel module's @triton.jit runs)."""
    roots = {"__future__", "logging", "math", "os", "collections", "dataclasses", "typing", "torch"}
    for path in sorted((REPO / "engine" / "ops").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith("engine") or name.startswith("engine.ops"), (path.name, name)
                if id(node) in top and not name.startswith("engine.ops") and name != "kernels.runtime":
                    assert name.split(".")[0] in roots, (path.name, name)
