"""Checkpoints that are either complete or absent.

DeepSpeed writes the resume state (student LoRA + optimizer + scheduler, `exclude_frozen_parameters=True`)
into `<root>/<tag>.partial/`; after every rank has finished, rank 0 fsyncs the files, writes a manifest with
their sizes and sha256, renames the dir to `<root>/<tag>/` (atomic on POSIX) and only then points
`<root>/latest.json` at it (temp file + fsync + rename). A kill at any moment leaves either the previous
pointer or the new one, each naming a complete, verified checkpoint.

Resuming takes the newest checkpoint whose files match its manifest (`find_resumable`); one that does not is
renamed `<tag>.corrupt` (kept for inspection, never loaded again) and the next older one is tried. Leftovers of
an interrupted write or prune (`*.partial`, `*.deleting`, temp files) are never loaded and are removed at start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError
from engine.files import fsync_dir, sha256, write_atomic

log = logging.getLogger(__name__)

POINTER = "latest.json"
MANIFEST = "manifest.json"
_TAG = re.compile(r"^step_\d{8}$")
# A ZeRO checkpoint holds, per trainable parameter, the module copy (in the model dtype, counted from the tensors
# DeepSpeed will write) + the fp32 master copy (4 bytes) + Adam's two fp32 moments (8), plus a fixed part: names,
# shapes, the DeepSpeed config and zip entries. Measured on the tiny preset (4864 student parameters, 48 tensors):
# 124 kB written for 78 kB of state, i.e. ~46 kB fixed; 128 kB leaves room for more tensor names.
OPTIMIZER_BYTES_PER_PARAM = 12
FIXED_BYTES = 128 << 10


def tag_for(step: int) -> str:
    """The checkpoint dir name of the step a checkpoint resumes at."""
    return f"step_{step:08d}"


def finalize(root: Path, tag: str, meta: dict[str, Any], keep: int,
             hook: Callable[[str], None] | None = None) -> Path:
    """Rank 0, after all ranks saved into `<tag>.partial`: manifest, fsync, rename, pointer, prune.

    `hook(point)` runs between the phases (fault injection in tests: `engine/faults.py`)."""
    partial, final = root / f"{tag}.partial", root / tag
    if not partial.is_dir() or not any(partial.iterdir()):
        raise CheckpointError(f"checkpoint {partial} is missing or empty after DeepSpeed's save")
    files = {}
    for f in sorted(p for p in partial.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(partial))] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    write_atomic(partial / MANIFEST, json.dumps({"tag": tag, "meta": meta, "files": files}, indent=1))
    if hook is not None:
        hook("ckpt.manifest")
    if final.exists():  # a same-step checkpoint from before a fallback: moved aside, then deleted
        _remove(final)
    os.replace(partial, final)
    fsync_dir(root)
    if hook is not None:
        hook("ckpt.renamed")
    write_atomic(root / POINTER, json.dumps({"tag": tag, **meta}))
    if hook is not None:
        hook("ckpt.pointer")
    prune(root, keep)
    return final


def discard_partial(root: Path, tag: str) -> None:
    """Remove what a failed save left in `<tag>.partial` (never loaded either way)."""
    shutil.rmtree(root / f"{tag}.partial", ignore_errors=True)


def verify(ckpt: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint dir; raises CheckpointError naming the bad file."""
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["meta"]["step"])
        if not files:
            raise ValueError("it lists no files")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable manifest {manifest_path}: {exc}") from exc
    for name, info in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: missing file {f}")
        if f.stat().st_size != info["bytes"] or sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {f} is corrupt (size or sha256 differs from manifest)")
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint dirs (manifest present), newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _TAG.match(p.name) and p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def unfinished_dirs(root: Path) -> list[Path]:
    """`step_*` dirs without a manifest. The writer renames a dir to `step_*` only after its manifest is in it, so
    one without is not this engine's checkpoint: a copy cut short, or files moved by hand."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TAG.match(p.name) and p.is_dir() and not (p / MANIFEST).is_file())


def quarantined(root: Path) -> list[Path]:
    """Checkpoints moved aside as `<tag>.corrupt*` (by this or an earlier start)."""
    return sorted(p for p in root.iterdir() if re.match(r"^step_\d{8}\.corrupt\d*$", p.name)) if root.is_dir() else []


def quarantine_dir(ckpt: Path) -> Path:
    """Rename a checkpoint that must never be loaded to `<tag>.corrupt` (kept for inspection); returns the new path."""
    bad = free_name(ckpt.with_name(ckpt.name + ".corrupt"))
    os.replace(ckpt, bad)
    return bad


def find_resumable(root: Path, quarantine: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, or None. A checkpoint that fails verification is skipped with a
    warning naming the bad file (and, with `quarantine`, renamed `<tag>.corrupt` so it is never tried again);
    the next older one is tried. A `step_*` dir without a manifest is never loaded either: a warning names it (and
    it is quarantined the same way). `latest.json` is informational: a kill between the rename of a new checkpoint
    and the pointer update leaves the pointer one behind, and the newer complete checkpoint is still used."""
    for odd in unfinished_dirs(root):
        log.warning("checkpoint dir %s has no %s: not a checkpoint this engine finished writing; never loaded", odd,
                    MANIFEST)
        if quarantine:
            log.warning("moved it to %s", quarantine_dir(odd))
    for ckpt in complete_checkpoints(root):
        try:
            manifest = verify(ckpt)
        except CheckpointError as exc:
            log.warning("%s; falling back to an older checkpoint", exc)
            if quarantine:
                log.warning("moved the corrupt checkpoint to %s", quarantine_dir(ckpt))
            continue
        return ckpt, manifest["meta"]
    return None


def scan_pickles(ckpt: Path) -> None:
    """Vet every torch file of a verified checkpoint with the restricted unpickler (engine/safe_load.py); raises
    UnsafeCheckpointError naming the first file that would run code. Hashes prove a file is the one the manifest
    lists, not that the manifest is ours: a planted payload can be re-hashed."""
    from engine.safe_load import scan

    for f in sorted(ckpt.rglob("*.pt")):
        scan(f)


def free_name(path: Path) -> Path:
    """`path`, or `path` with a number appended when that name is taken."""
    candidate, i = path, 1
    while candidate.exists():
        candidate, i = path.with_name(f"{path.name}{i}"), i + 1
    return candidate


def _remove(path: Path) -> None:
    """Delete a checkpoint dir so that a kill half-way never leaves a dir that looks complete but is not."""
    doomed = free_name(path.with_name(path.name + ".deleting"))
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, then the leftovers."""
    for old in complete_checkpoints(root)[keep:]:
        _remove(old)
    clean_stale(root)


def clean_stale(root: Path) -> list[Path]:
    """Remove leftovers of interrupted writes, prunes and pointer updates; returns what was removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir()
             if p.name.endswith((".partial", ".deleting")) or re.search(r"\.deleting\d+$", p.name)
             or (p.name.startswith(".") and ".tmp" in p.name)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def estimate_bytes(module_state: dict[str, Any], trainable: int) -> int:
    """The size of one checkpoint before any is written: the tensors of `module_state` (what DeepSpeed saves of
    the module) + the optimizer state of `trainable` parameters + the fixed part."""
    tensors = sum(t.numel() * t.element_size() for t in module_state.values() if hasattr(t, "element_size"))
    return tensors + OPTIMIZER_BYTES_PER_PARAM * trainable + FIXED_BYTES


def checkpoint_bytes(ckpt: Path) -> int:
    """Total size of a complete checkpoint's files, from its manifest."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    return sum(int(info["bytes"]) for info in manifest["files"].values())


def check_free_space(root: Path, need: int, keep: int) -> None:
    """Raise CheckpointError when the file system of `root` cannot hold even one more checkpoint of `need`
    bytes; warn when it cannot hold `keep` + 1 (the kept ones plus the one being written)."""
    probe = next(q for q in [root, *root.parents] if q.exists())
    free = shutil.disk_usage(probe).free
    if free < need:
        raise CheckpointError(
            f"{probe} has {free / 1e6:.1f} MB free but one checkpoint of this run needs ~{need / 1e6:.1f} MB; "
            f"free some space or choose another output_dir"
        )
    if free < need * (keep + 1):
        log.warning("%s has %.1f MB free: less than the %d checkpoints (~%.1f MB each) a run keeps while writing "
                    "the next one", probe, free / 1e6, keep + 1, need / 1e6)


def to_universal(ckpt: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format in `out/<tag>` (loadable at any world size)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / ckpt.name
    # DeepSpeed's converter unpickles with weights_only=False: it runs under engine.safe_load's restricted loads
    cmd = [sys.executable, "-m", "engine.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(ckpt), "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    root = str(Path(__file__).resolve().parents[1])  # this engine, whatever the caller's cwd and sys.path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise CheckpointError(
            f"converting {ckpt} to a universal checkpoint (to resume at another world size) failed:\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
    return target
