"""Checkpoints that are either complete or absent.

DeepSpeed writes the resume state (student LoRA + optimizer + scheduler, `exclude_frozen_parameters=True`)
into `<root>/<tag>.partial/`; after every rank has finished, rank 0 fsyncs the files, writes a manifest with
their sizes and sha256, renames the dir to `<root>/<tag>/` (atomic on POSIX) and only then points
`<root>/latest.json` at it (temp file + fsync + rename). A kill at any moment leaves either the previous
pointer or the new one, each naming a complete, verified checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POINTER = "latest.json"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def finalize(root: Path, tag: str, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0, after all ranks saved into `<tag>.partial`: manifest, fsync, rename, pointer, prune."""
    partial, final = root / f"{tag}.partial", root / tag
    files = {}
    for f in sorted(p for p in partial.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(partial))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    write_atomic(partial / MANIFEST, json.dumps({"tag": tag, "meta": meta, "files": files}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    write_atomic(root / POINTER, json.dumps({"tag": tag, **meta}))
    prune(root, keep)
    return final


def verify(ckpt: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint dir; raises CheckpointError naming the bad file."""
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable manifest {manifest_path}: {exc}") from exc
    for name, info in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: missing file {f}")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {f} is corrupt (size or sha256 differs from manifest)")
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint dirs (manifest present), newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".partial")
            and (p / MANIFEST).is_file()]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def find_resumable(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies (falling back to older ones with a warning), or None."""
    candidates = complete_checkpoints(root)
    pointer = root / POINTER
    if pointer.is_file():
        try:
            tag = json.loads(pointer.read_text())["tag"]
            preferred = root / tag
            if preferred in candidates:
                candidates.remove(preferred)
                candidates.insert(0, preferred)
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            log.warning("checkpoint pointer %s is unreadable (%s); scanning %s", pointer, exc, root)
    for ckpt in candidates:
        try:
            manifest = verify(ckpt)
            return ckpt, manifest["meta"]
        except CheckpointError as exc:
            log.warning("%s; trying an older checkpoint", exc)
    return None


def prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
