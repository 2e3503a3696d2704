"""The house's shape from the code's own imports (docs/architecture.md): no import cycle among engine/ and
kernels/ modules, every import goes to the importer's layer or below, no engine file over 500 lines, the trainer at
most 400. Function-level and TYPE_CHECKING imports count: they are dependencies too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (module prefix, layer); the longest matching prefix wins. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, int]] = [
    ("kernels", 0), ("engine", 0), ("engine.ops", 0), ("engine.errors", 0), ("engine.files", 0), ("engine.rng", 0),
    ("engine.profiling", 0), ("engine.sampling.schedule", 0), ("engine.safe_load", 0),
    ("engine.config.schema", 1), ("engine.config.checks", 1), ("engine.config.eval_schema", 1),
    ("engine.config.rl_schema", 1),
    ("engine.config.opd", 1),
    ("engine.backends", 2), ("engine.backends.base", 2), ("engine.worlds", 2),
    ("engine.eval.scorers", 2), ("engine.eval.scorers.base", 2),
    ("engine.config.io", 3),
    ("engine.backends.", 4), ("engine.eval.scorers.", 4),
    ("engine.adapters", 5),
    ("engine.data", 6),
    ("engine.fields", 7),
    ("engine.sampling", 8),
    ("engine.opd", 9), ("engine.rl", 9), ("engine.objective", 9),
    ("engine.checkpoint", 10), ("engine.checkpointer", 10), ("engine.objectives", 10), ("engine.student", 10),
    ("engine.ds_config", 10),
    ("engine.distributed", 10), ("engine.hooks", 10), ("engine.faults", 10), ("engine.metrics", 10),
    ("engine.resume", 10), ("engine.watchdog", 10), ("engine.ema", 10),
    ("engine.trainer", 11),
    ("engine.worlds.", 12), ("engine.eval", 12),
    ("engine.config", 13), ("engine.config.load", 13), ("engine.config.preflight", 13), ("engine.config.__main__", 13),
    ("engine.train", 14), ("engine.experiment", 14),
]


def _modules() -> dict[str, Path]:
    files = [p for root in ("engine", "kernels") for p in (REPO / root).rglob("*.py")]
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _imports(mods: dict[str, Path], name: str, path: Path) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != name:
                out.add(n)
    return out


def layer(module: str) -> int:
    """The layer of `module` (the longest prefix in LAYERS; `engine.backends.` = any family folder)."""
    best, value = "", -1
    for prefix, lay in LAYERS:
        hit = module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")
        if hit and len(prefix) > len(best):
            best, value = prefix, lay
    assert value >= 0, f"{module} has no layer in LAYERS (add it, and to docs/architecture.md)"
    return value


def test_imports_only_flow_downward_and_there_is_no_cycle() -> None:
    mods = _modules()
    graph = {m: _imports(mods, m, p) for m, p in mods.items()}
    upward = sorted(f"{m} (L{layer(m)}) -> {t} (L{layer(t)})" for m, ts in graph.items() for t in ts
                    if layer(t) > layer(m))
    assert upward == []
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            assert seen.get(t) != 1, f"import cycle: {' -> '.join([*stack[stack.index(t):], t])}"
            if t not in seen:
                visit(t, [*stack, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


def test_file_sizes() -> None:
    big = {str(p.relative_to(REPO)): n for p in (REPO / "engine").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500}
    assert big == {}
    assert len((REPO / "engine" / "trainer.py").read_text().splitlines()) <= 400
