"""Checkpoint files, metrics.jsonl and the fault hooks, without training (fast): every state a kill or a full disk
can leave behind either resumes from a complete, verified checkpoint or is never loaded."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from engine import checkpoint as ck
from engine import faults
from engine.metrics import MetricsWriter, read_metrics


class Killed(Exception):
    """Raised by a hook to stop `finalize` between two phases: what is on disk then is what SIGKILL leaves."""


def partial(root: Path, step: int, payload: bytes = b"state") -> str:
    tag = ck.tag_for(step)
    d = root / f"{tag}.partial"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload[::-1] * 50)
    return tag


def save(root: Path, step: int, keep: int = 5, hook=None) -> Path:
    tag = partial(root, step, f"s{step}".encode())
    return ck.finalize(root, tag, {"step": step, "world_size": 1}, keep, hook)


def resumed_step(root: Path, quarantine: bool = False) -> int | None:
    found = ck.find_resumable(root, quarantine)
    return None if found is None else found[1]["step"]


def test_finalize_writes_a_verifiable_manifest_and_pointer(tmp_path: Path) -> None:
    final = save(tmp_path, 2)
    assert final == tmp_path / "step_00000002" and not (tmp_path / "step_00000002.partial").exists()
    manifest = ck.verify(final)
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert json.loads((tmp_path / ck.POINTER).read_text())["tag"] == "step_00000002"
    assert resumed_step(tmp_path) == 2
    assert ck.checkpoint_bytes(final) == sum(f.stat().st_size for f in final.iterdir() if f.name != ck.MANIFEST)


@pytest.mark.parametrize(
    ("phase", "expected"),
    [("ckpt.manifest", 2), ("ckpt.renamed", 4), ("ckpt.pointer", 4)],
)
def test_a_kill_between_finalize_phases_resumes_from_a_complete_checkpoint(tmp_path: Path, phase: str,
                                                                          expected: int) -> None:
    save(tmp_path, 2)

    def hook(point: str) -> None:
        if point == phase:
            raise Killed

    with pytest.raises(Killed):
        save(tmp_path, 4, keep=1, hook=hook)
    assert resumed_step(tmp_path) == expected
    if phase == "ckpt.renamed":  # the pointer is one behind; the newer complete checkpoint still wins
        assert json.loads((tmp_path / ck.POINTER).read_text())["tag"] == "step_00000002"
    removed = ck.clean_stale(tmp_path)
    assert all(p.name.endswith(".partial") for p in removed)
    assert resumed_step(tmp_path) == expected


def test_partial_and_half_deleted_dirs_are_never_loaded(tmp_path: Path) -> None:
    save(tmp_path, 2)
    tag = partial(tmp_path, 4)
    (tmp_path / f"{tag}.partial" / ck.MANIFEST).write_text(json.dumps({"tag": tag, "meta": {"step": 4}, "files": {}}))
    doomed = tmp_path / "step_00000006.deleting"  # a prune killed half-way: manifest present, files gone
    (tmp_path / "step_00000006").mkdir()
    (tmp_path / "step_00000006" / ck.MANIFEST).write_text("{}")
    os.replace(tmp_path / "step_00000006", doomed)
    (tmp_path / ".latest.json.tmp123").write_text("{")
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000002"]
    assert resumed_step(tmp_path) == 2
    assert {p.name for p in ck.clean_stale(tmp_path)} == {f"{tag}.partial", doomed.name, ".latest.json.tmp123"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_named_skipped_and_quarantined(tmp_path: Path, damage: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    victim = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one bit: only the checksum sees it
        victim.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "delete":
        victim.unlink()
    else:
        victim = newest / ck.MANIFEST
        victim.write_text('{"tag": "step_00000004", "fi')
    with pytest.raises(ck.CheckpointError, match=str(victim)):
        ck.verify(newest)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert resumed_step(tmp_path, quarantine=True) == 2
    assert str(victim) in caplog.text and "falling back to an older checkpoint" in caplog.text
    assert (tmp_path / "step_00000004.corrupt").is_dir() and not newest.exists()
    assert resumed_step(tmp_path) == 2  # the quarantined one is not tried again
    assert (tmp_path / "step_00000004.corrupt") not in ck.clean_stale(tmp_path)  # kept for inspection


def test_all_checkpoints_bad_means_start_fresh(tmp_path: Path) -> None:
    only = save(tmp_path, 2)
    (only / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert ck.find_resumable(tmp_path) is None
    assert ck.find_resumable(tmp_path / "missing") is None


def test_prune_keeps_the_newest_and_a_resave_replaces_the_same_step(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save(tmp_path, step, keep=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    save(tmp_path, 6, keep=2)  # after a fallback the same step is written again
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]


def test_finalize_refuses_an_empty_partial(tmp_path: Path) -> None:
    (tmp_path / "step_00000002.partial").mkdir()
    with pytest.raises(ck.CheckpointError, match="missing or empty"):
        ck.finalize(tmp_path, "step_00000002", {"step": 2}, 2)


def test_free_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=5_000_000))
    with pytest.raises(ck.CheckpointError, match=r"has 5.0 MB free but one checkpoint of this run needs ~8.0 MB"):
        ck.check_free_space(tmp_path / "run" / "checkpoints", 8_000_000, keep=2)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        ck.check_free_space(tmp_path / "run" / "checkpoints", 2_000_000, keep=2)
    assert "less than the 3 checkpoints" in caplog.text


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_survive_failed_and_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.metrics as m

    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    real_write = os.write
    script = iter(["ok", "enospc", "short", "ok", "ok"])

    def flaky(fd: int, data: bytes) -> int:
        what = next(script, "ok")
        if what == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        if what == "short":  # the disk filled up half-way through the line
            return real_write(fd, data[:7])
        return real_write(fd, data)

    monkeypatch.setattr(m.os, "write", flaky)
    for step in range(4):
        writer.write({"step": step, "loss": 0.5 * step, "bad": float("nan")})
    writer.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["bad"] is None


def test_metrics_resume_drops_later_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    writer = MetricsWriter(path, resume_step=3)
    writer.write({"step": 3})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------- faults


def test_fault_spec_parsing_and_rank_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env(0) is None  # off by default: the trainer's hook sites see None
    monkeypatch.setenv(faults.ENV, "ckpt.saved@4=kill,step.begin@2:1=hang")
    assert [f.point for f in faults.from_env(0).faults] == ["ckpt.saved"]
    assert [f.point for f in faults.from_env(1).faults] == ["ckpt.saved", "step.begin"]
    for bad in ("ckpt.saved=kill", "nowhere@1=kill", "step.end@1=explode", "step.end@x=kill"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)
    injector = faults.FaultInjector(faults.parse("ckpt.manifest@4=enospc"), rank=0)
    injector.hit("ckpt.manifest", 2)  # other step: nothing
    with pytest.raises(OSError, match="No space left") as err:
        injector.hit("ckpt.manifest", 4)
    assert err.value.errno == errno.ENOSPC
