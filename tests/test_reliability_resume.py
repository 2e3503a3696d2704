"""A re-run resumes only what it safely can: a checkpoint file that would run code is refused by name (the payload
never runs), a config that changes what training computes is refused with the changed keys, and a run dir whose
checkpoints are gone while metrics.jsonl holds later steps is refused instead of silently starting over."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import typing
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine import safe_load
from engine.config import Config, load_config
from engine.metrics import read_metrics
from engine.resume import IMPLEMENTATION, OPERATIONAL, config_changes, flatten, kind_of, stored_config
from engine.train import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
FAST = ["rollout.steps=4", "train.steps=2", "train.save_every=1", "rollout.group_size=1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes run ~10x faster on one intra-op thread on a shared 2-core machine (see test_reliability_train)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(out: Path, *sets: str, flags: tuple[str, ...] = ()) -> int:
    args = ["--config", str(TINY), "--output-dir", str(out), *flags]
    for s in (*FAST, *sets):
        args += ["--set", s]
    return main(args)


class Payload:
    """What an attacker plants: unpickling it calls os.system (creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(victim: Path, marker: Path) -> None:
    """Add a payload to a real checkpoint file and re-hash the manifest, as someone with write access could."""
    state = safe_load.load(victim, map_location="cpu")
    state["client_extra"] = Payload(marker)
    torch.save(state, victim)
    manifest_path = victim.parent / ck.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][victim.name] = {"bytes": victim.stat().st_size, "sha256": ck.sha256(victim)}
    manifest_path.write_text(json.dumps(manifest))
    assert ck.verify(victim.parent)  # the hashes no longer catch it
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with checkpoints step_1 and step_2 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------------------------------ safe loading


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_payload_never_runs_and_the_checkpoint_is_refused_by_name(
        finished: Path, tmp_path: Path, victim: str, capsys: pytest.CaptureFixture) -> None:
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    target = out / "checkpoints" / "step_00000002" / victim
    plant(target, marker)
    config_before = (out / "config.toml").read_bytes()
    assert train(out, "train.steps=3") == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"{target} is refused" in err and "could run code" in err and "nothing was resumed" in err
    assert (out / "checkpoints" / "step_00000002.corrupt" / victim).is_file()  # quarantined, kept for inspection
    assert (out / "checkpoints" / "step_00000001").is_dir()  # the older one was not loaded instead
    assert (out / "config.toml").read_bytes() == config_before
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1]
    # the next re-run resumes from the older, clean checkpoint (the quarantined one is never tried again)
    assert train(out, "train.steps=3") == 0
    assert not marker.exists()
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


def test_every_torch_load_inside_the_guard_is_restricted(tmp_path: Path) -> None:
    marker, f = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2), "p": Payload(marker)}, f)
    with safe_load.only_safe_loads():
        with pytest.raises(safe_load.UnsafeCheckpointError, match=f"{f} is refused.*os.system|{f} is refused"):
            torch.load(f, weights_only=False)  # what DeepSpeed's loaders call
    assert not marker.exists()
    assert torch.load is safe_load._torch_load  # restored
    with pytest.raises(safe_load.UnsafeCheckpointError):
        safe_load.scan(f)
    assert not marker.exists()


def test_the_universal_conversion_runs_under_restricted_loads(finished: Path, tmp_path: Path) -> None:
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoints" / "step_00000002"
    converted = ck.to_universal(ckpt, tmp_path / "universal")  # the clean checkpoint converts
    assert (converted / "zero").is_dir()
    plant(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ck.CheckpointError, match="is refused"):
        ck.to_universal(ckpt, tmp_path / "universal2")
    assert not marker.exists()


def test_every_type_a_deepspeed_checkpoint_holds_is_allowed(finished: Path, tmp_path: Path) -> None:
    bf16 = tmp_path / "bf16"
    assert train(bf16, "train.steps=1", "model.dtype='bfloat16'") == 0
    files = sorted((finished / "checkpoints").rglob("*.pt")) + sorted((bf16 / "checkpoints").rglob("*.pt"))
    assert any("bf16_zero" in f.name for f in files)
    for f in files:
        safe_load.scan(f)  # no refusal: the allow-list covers what ZeRO-2 writes in float32 and bfloat16
    assert len(safe_load.safe_globals()) == len(safe_load.SAFE_GLOBALS)


def test_checkpoints_hold_trainable_state_only(finished: Path) -> None:
    """No frozen parameter and no buffer (SD3's pos_embed buffer is 906 MB at SD3.5-M size); the preflight's estimate
    is what is really written, never less."""
    from engine.backends import get_backend
    from engine.config import load_config as load
    from engine.student import build_student

    ckpt = finished / "checkpoints" / "step_00000002"
    module = safe_load.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")
    cfg = load(finished / "config.toml")
    model, _ = build_student(cfg, get_backend("sd3"))
    trainable = {n for n, p in model.named_parameters() if "lora" in n and ".student." in n}
    assert set(module["module"]) == trainable and module["buffer_names"] == []
    state = 16 * sum(model.get_parameter(n).numel() for n in trainable)  # fp32 copy + master + 2 Adam moments
    written = ck.checkpoint_bytes(ckpt)
    assert state < written <= state + ck.FIXED_BYTES  # measured: 124 kB for 78 kB of state
    estimate = ck.estimate_bytes(module["module"], sum(model.get_parameter(n).numel() for n in trainable))
    assert written <= estimate <= written + ck.FIXED_BYTES


# ----------------------------------------------------------------------------------------------- config changes


def test_a_changed_config_is_refused_with_the_changed_keys_and_nothing_is_rewritten(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = copy_run(finished, tmp_path)
    before = (out / "config.toml").read_bytes()
    assert train(out, "train.steps=3", "train.lr=0.0005", "opd.loss='mse'", "teachers.0.random_seed=9") == 1
    err = capsys.readouterr().err
    assert "step 2) was trained with another config" in err
    for line in ('train.lr: 0.001 -> 0.0005', 'opd.loss: "gkd" -> "mse"', "teachers[0].random_seed: 1 -> 9"):
        assert line in err, err
    assert "train.steps" not in err  # operational: extending a run is fine
    assert (out / "config.toml").read_bytes() == before and not list(out.glob("config.step_*"))
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1]

    # --allow-config-change: each change logged, the old config kept, the new one recorded
    with caplog.at_level(logging.INFO, logger="flowopd"):
        assert train(out, "train.steps=3", "train.lr=0.0005", flags=("--allow-config-change",)) == 0
    assert "resuming step_00000002 with a changed config: train.lr: 0.001 -> 0.0005" in caplog.text
    assert (out / "config.step_2.toml").read_bytes() == before
    assert load_config(out / "config.toml").train.lr == 0.0005
    rows = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in rows] == [0, 1, 2] and rows[2]["lr"] == 0.0005  # the optimizer has the new lr


def test_operational_and_implementation_changes_resume(finished: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = copy_run(finished, tmp_path)
    with caplog.at_level(logging.INFO, logger="flowopd"):
        assert train(out, "train.steps=3", "train.log_every=2", "opd.evaluator='batched'") == 0
    assert "opd.evaluator" in caplog.text and "no longer bit-exact" in caplog.text
    assert "resumed from" in caplog.text and not list(out.glob("config.step_*"))
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


def test_every_key_has_a_kind_and_unknown_keys_are_trajectory() -> None:
    keys = flatten(dataclasses.asdict(load_config(TINY)))
    kinds = {k: kind_of(k) for k in keys}
    assert {k for k, v in kinds.items() if v == "operational"} >= {"output_dir", "train.steps", "train.save_every",
                                                                 "report.enabled", "experiment.variants"}
    assert {k for k, v in kinds.items() if v == "implementation"} == set(IMPLEMENTATION)
    for k in ("train.lr", "train.seed", "opd.loss", "model.dtype", "model.preset", "kernels.cuda_graphs",
              "teachers[0].path", "fields[1].cfg_scale", "fields.count", "data.encoder", "init.merge"):
        assert kinds[k] == "trajectory", k
    assert kind_of("train.some_future_key") == "trajectory"  # default deny
    for prefix in OPERATIONAL + IMPLEMENTATION:  # every listed key exists (a rename would silently re-classify it)
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix


def test_stored_configs_old_and_new() -> None:
    cfg = load_config(TINY)
    meta = {"step": 4, "config": dataclasses.asdict(cfg)}
    del meta["config"]["train"]["eps"]  # written by an older schema: the absent key takes its default
    flat, sections = stored_config(meta)
    assert sections is None and config_changes(flat, sections, cfg) == []
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eps=1e-6))
    assert [str(c) for c in config_changes(flat, sections, other)] == ["train.eps: 1e-08 -> 1e-06"]
    # a checkpoint of the old format: only the digest of [model] and [student]
    legacy = {"step": 4, "resume_digest": json.dumps({k: dataclasses.asdict(getattr(cfg, k))
                                                      for k in ("model", "student")}, sort_keys=True)}
    flat, sections = stored_config(legacy)
    assert config_changes(flat, sections, other) == []  # train.* is not in a legacy digest
    wider = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, rank=8))
    assert [c.key for c in config_changes(flat, sections, wider)] == ["student.rank"]
    assert stored_config({"step": 1}) is None
    # prompts_per_step is per rank: 2 ranks x 1 prompt = 1 rank x 2 prompts; another global batch is a change
    flat, sections = stored_config({"step": 4, "config": dataclasses.asdict(cfg)})  # tiny: 2 prompts per rank
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, prompts_per_step=1))
    assert config_changes(flat, sections, half, ranks=(1, 2)) == []
    assert [str(c) for c in config_changes(flat, sections, half, ranks=(1, 1))] == [
        "train.prompts_per_step x ranks: 2 -> 1"]
    assert typing.get_type_hints(Config)  # the schema stays introspectable (flatten relies on asdict)


# ------------------------------------------------------------------------------------- checkpoints gone, metrics kept


@pytest.mark.parametrize("damage", ["deleted", "all_corrupt"])
def test_no_checkpoint_left_but_metrics_is_refused_unless_restart(finished: Path, tmp_path: Path, damage: str,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out = copy_run(finished, tmp_path)
    if damage == "deleted":
        shutil.rmtree(out / "checkpoints")
    else:
        for ckpt in ck.complete_checkpoints(out / "checkpoints"):
            victim = ckpt / "mp_rank_00_model_states.pt"
            victim.write_bytes(victim.read_bytes()[:100])
    old_metrics = (out / "metrics.jsonl").read_bytes()
    assert train(out) == 1
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "holds 2 logged steps (0..1)" in err and "--restart" in err
    if damage == "all_corrupt":
        assert "step_00000001.corrupt" in err and "step_00000002.corrupt" in err
    assert (out / "metrics.jsonl").read_bytes() == old_metrics
    assert train(out, flags=("--restart",)) == 0
    assert (out / "metrics.before-restart.jsonl").read_bytes() == old_metrics
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1]


def test_killed_before_the_first_checkpoint_starts_over_without_asking(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")  # step 0 logged, checkpoint 1 never written
    assert train(out) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1]
