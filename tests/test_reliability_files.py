"""What runs leave on disk and what a planted or damaged file does: the run-dir lock never follows a symlink, a killed
export leaves nothing behind after the next start, exports are byte-reproducible across processes, a step dir
without manifest and a damaged middle metrics line are named (never silently ignored or dropped)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from engine import checkpoint as ck
from engine.adapters.export import canonical_safetensors, clean_stale_exports
from engine.errors import CheckpointError
from engine.files import RunDirLock
from engine.metrics import MetricsWriter, read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["symlink", "dangling", "directory"])
def test_the_lock_never_follows_a_symlink_or_writes_a_non_file(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "precious.txt"
    if kind == "symlink":
        target.write_text("do not truncate me\n")
        (run / ".lock").symlink_to(target)
    elif kind == "dangling":
        (run / ".lock").symlink_to(target)
    else:
        (run / ".lock").mkdir()
    with pytest.raises(CheckpointError, match=r"\.lock.*(symbolic link|not a regular file|Is a directory)"):
        RunDirLock(run)
    if kind == "symlink":
        assert target.read_text() == "do not truncate me\n"
    else:
        assert not target.exists()  # a dangling link is not followed to create its target either


def test_a_killed_export_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "adapter_model.safetensors").write_bytes(b"new")
    junk = tmp_path / ".export.k3j_x9"  # mkdtemp's dir of an export killed while writing
    junk.mkdir()
    (junk / "adapter_model.safetensors").write_bytes(b"half")
    old = tmp_path / "export.old"
    old.mkdir()
    other = tmp_path / ".exports_of_someone_else"  # not ours: kept
    other.mkdir()
    assert sorted(p.name for p in clean_stale_exports(export)) == [".export.k3j_x9", "export.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exports_of_someone_else", "export"]
    # killed between moving the old export aside and renaming the new one in: the old one is put back
    os.replace(export, old)
    assert clean_stale_exports(export) == [] and (export / "adapter_model.safetensors").read_bytes() == b"new"


_EXPORT = """
import sys, torch
torch.manual_seed(0)
from tests.helpers import tiny_model, randomize_student
from engine.adapters.export import export_adapter
from engine.backends import get_backend
model = tiny_model(teachers=0)
randomize_student(model)
export_adapter(model, sys.argv[1], get_backend("sd3"))
"""


def test_two_exports_of_the_same_weights_are_byte_identical(tmp_path: Path) -> None:
    dirs = []
    for seed in ("1", "2"):  # another hash seed per process: the order safetensors wrote its metadata map in
        out = tmp_path / f"export{seed}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _EXPORT, str(out)], env=env, cwd=REPO, check=True,
                       capture_output=True)
        dirs.append(out)
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == ["SHA256SUMS", "adapter_config.json", "adapter_model.safetensors",
                     "pytorch_lora_weights.safetensors"]
    for name in names:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name
    with safe_open(str(dirs[0] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert sorted(f.metadata()) == ["format", "lora_adapter_metadata"]


def test_canonical_header_keeps_every_tensor_and_metadata(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.bfloat16),
               "c": torch.zeros(1, dtype=torch.int8)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"z": "1", "a": "2", "m": "ü"})
    canonical_safetensors(path)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"z": "1", "a": "2", "m": "ü"}
    size = int.from_bytes(path.read_bytes()[:8], "little")
    assert size % 8 == 0 and list(json.loads(path.read_bytes()[8 : 8 + size])["__metadata__"]) == ["a", "m", "z"]


def test_a_step_dir_without_manifest_is_named_and_quarantined(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "step_00000002.partial"
    good.mkdir()
    (good / "mp_rank_00_model_states.pt").write_bytes(b"state")
    ck.finalize(tmp_path, "step_00000002", {"step": 2}, keep=2)
    copied = tmp_path / "step_00000004"  # e.g. an rsync cut short: files, no manifest
    copied.mkdir()
    (copied / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        found = ck.find_resumable(tmp_path, quarantine=True)
    assert found is not None and found[0].name == "step_00000002"
    assert f"checkpoint dir {copied} has no manifest.json" in caplog.text
    assert (tmp_path / "step_00000004.corrupt").is_dir() and not copied.exists()
    assert [p.name for p in ck.quarantined(tmp_path)] == ["step_00000004.corrupt"]


def test_a_damaged_middle_metrics_line_is_named_and_the_file_kept(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(5)]
    lines[2] = lines[2][:9] + "\x00\x00" + lines[2][11:]  # bytes damaged on disk
    original = "\n".join(lines) + '\n{"step": 5, "lo'  # plus a torn last line: what a kill leaves
    path.write_text(original)
    with caplog.at_level(logging.WARNING, logger="engine.metrics"):
        MetricsWriter(path, resume_step=4).close()
    assert f"{path}: line(s) 3 are unreadable and not the last line" in caplog.text
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == original
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 3]
    caplog.clear()
    with open(path, "a") as fh:
        fh.write('{"step": 3.5, "los')
    with caplog.at_level(logging.WARNING, logger="engine.metrics"):
        MetricsWriter(path, resume_step=4).close()  # a torn last line alone is a kill, not damage: no warning
    assert "unreadable" not in caplog.text and [r["step"] for r in read_metrics(path)] == [0, 1, 3]
