"""Preflight: what only the files and this machine can tell, checked before any heavy work (exit 2, nothing
written): inputs that do not exist, an unwritable output dir, dtypes the device lacks, prompts whose tasks have no
route, edit rows' images (missing, unreadable, refused by the family: named by file and line), the student's targets
on the real architecture (the family backend builds it on the meta device)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.config.io import deepspeed_json, resolve_path
from engine.config.schema import Config


def check_paths(c: Config) -> list[str]:
    """Every file/dir the run will read that does not exist, found before any heavy work starts."""
    from engine.worlds import find_world

    p: list[str] = []

    def need(where: str, path: str, kind: str = "path") -> None:
        if path and not resolve_path(path).exists():
            p.append(f"{where}: {kind} not found: {path}")

    need("model.path", c.model.path, "model dir")
    for i, t in enumerate(c.teachers):
        need(f"teachers[{i}].path ({t.name})", t.path, "adapter")
    need("init.adapter", c.init.adapter, "adapter")
    for name, path in c.report.rows.items():
        need(f"report.rows.{name}", path, "adapter")
    if not c.data.prompts.startswith("builtin:"):
        need("data.prompts", c.data.prompts, "prompt file")
        if resolve_path(c.data.prompts).is_dir():
            p.append(f"data.prompts: {c.data.prompts} is a directory; expected a .jsonl or .txt prompt file")
    if c.data.encoder != "builtin" and find_world(c.data.encoder) is None:
        need("data.encoder", c.data.encoder, f"{c.model.family} pipeline dir")
    if not deepspeed_json(c).is_file():
        p.append(f"train.deepspeed: DeepSpeed config not found: {c.train.deepspeed}")
    out = Path(c.output_dir)
    existing = next((q for q in [out, *out.parents] if q.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        p.append(f"output_dir: {existing} is not a writable directory")
    from engine.eval.checks import path_problems

    return p + path_problems(c)


def check_environment(c: Config) -> list[str]:
    """What only this machine and the inputs can tell, checked before any heavy work: the device's dtypes, the
    DeepSpeed JSON, the prompts against the routes, the family's own preflight (targets, widths)."""
    from engine.backends import get_backend

    p: list[str] = []
    if c.model.dtype == "float16":
        import torch

        if not torch.cuda.is_available():
            p.append("model.dtype = 'float16' needs a CUDA device (DeepSpeed has no fp16 on CPU); use bfloat16 "
                     "or float32")
    ds = deepspeed_json(c)
    if ds.is_file():
        try:
            if not isinstance(json.loads(ds.read_text()), dict):
                raise ValueError("expected a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            p.append(f"train.deepspeed: cannot parse {ds}: {exc}")
    p.extend(_check_prompts(c))
    from engine.eval.checks import environment_problems

    p.extend(environment_problems(c))
    try:
        backend = get_backend(c.model.family)
    except KeyError:
        return p  # reported by validate
    p.extend(_check_edit_rows(c, backend))
    p.extend(backend.preflight(c))
    return p


def _check_edit_rows(c: Config, backend: Any) -> list[str]:
    """Edit rows' images (engine/data/edits.py): each missing or unreadable source/target, an edit task's row
    without a source, a source the family refuses, named by prompt file and line."""
    from engine.data.edits import edit_problems
    from engine.data.prompts import load_prompts

    try:
        prompts = load_prompts(c.data.prompts)
    except (ValueError, ImportError, OSError, KeyError):
        return []  # reported by _check_prompts
    if not any(q.source for q in prompts):
        return []
    return [f"data.prompts: {q}" for q in edit_problems(prompts, lambda size: backend.source_image_problem(c, size))]


def _check_prompts(c: Config) -> list[str]:
    from engine.data.prompts import load_prompts

    if not c.data.prompts or (not c.data.prompts.startswith("builtin:") and not Path(c.data.prompts).is_file()):
        return []  # reported by validate / check_paths
    try:
        tasks = sorted({q.task for q in load_prompts(c.data.prompts)})
    except (ValueError, ImportError, OSError, KeyError) as exc:
        return [f"data.prompts = {c.data.prompts!r}: {exc}"]
    if c.data.task_weights:
        from engine.data.sampler import weighted_pool

        try:
            weighted_pool(load_prompts(c.data.prompts), c.data.task_weights)
        except ValueError as exc:
            return [str(exc)]
        if unknown := sorted(set(c.data.task_weights) - set(tasks)):
            return [f"data.task_weights: task(s) {unknown} have no prompts in data.prompts (tasks: {tasks})"]
    o = c.opd
    if o.routing == "task" and o.routes and (unrouted := [t for t in tasks if t not in o.routes]):
        return [f"opd.routes has no field for task(s) {unrouted} of data.prompts (routes: {sorted(o.routes)})"]
    if o.routing == "epoch" and o.routes and not set(tasks) & set(o.routes):
        return [f"opd.routes: no task of data.prompts ({tasks}) has a route, so routing = 'epoch' has nothing to "
                f"train on"]
    buckets = [t for t, n in o.epoch_counts.items() if n > 0] if o.routing == "epoch" and o.epoch_counts else o.routes
    if o.routing in ("step", "epoch") and (empty := sorted(t for t in buckets if t not in tasks)):
        return [f"opd.routing = {o.routing!r} draws each step from one route's prompts: routed task(s) {empty} have "
                f"no prompts in data.prompts (tasks: {tasks})"]
    return []
