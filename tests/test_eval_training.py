"""Validation and trackers in a training run: a short run on a tiny SD3 pipeline dir (VAE, CLIP-L/G, T5,
transformer) writes validation PNGs and TensorBoard events with the scalars and images; a killed and resumed run on
the miniature world keeps one curve; the reward-hacking alarm; wandb's calls (a stand-in module); config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tests.fake_scorers as fs
from engine.config import load_config
from engine.errors import ConfigError
from engine.eval.validation import alarm, read_scores
from engine.metrics import read_metrics
from tests.fake_sd3 import build_fake_sd3

REPO = Path(__file__).resolve().parents[1]


def tb_events(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]], list[str]]:
    """(scalar tag -> [(step, value)], image tag -> [steps], tensor tags) of `<run>/tb` as TensorBoard shows them
    (events superseded by a resumed run's purge_step removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}
    images = {t: [e.step for e in ea.Images(t)] for t in tags["images"]}
    return scalars, images, list(tags["tensors"])


def test_short_run_writes_validation_pngs_tensorboard_and_export_best(tmp_path: Path) -> None:
    from engine.experiment import train_run

    pipe = build_fake_sd3(tmp_path / "sd3")
    pick, aes = fs.build_clip(tmp_path / "pickscore"), fs.build_aesthetic(tmp_path / "aesthetic")
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'model.path="{pipe}"', f'data.encoder="{pipe}"', "data.max_sequence_length=12", "train.steps=4",
        "train.save_every=2", "rollout.steps=3", "rollout.group_size=1", f'output_dir="{out}"',
        "validation.every=2", 'validation.prompts=["[compose] a red square", "[text] the digit 7"]',
        "validation.seeds=[0, 1]", "validation.steps=3", "validation.cfg_scale=2.0",
        f'validation.scorers={{pickscore="{pick}", aesthetic="{aes}"}}', 'validation.select="pickscore"',
        'validation.alarm_quality="aesthetic"', 'validation.alarm_reward="pickscore"'], paths=True)
    train_run(cfg)

    pngs = sorted(p.name for p in (out / "validation").glob("step_*.png"))
    assert pngs == ["step_00000000.png", "step_00000002.png", "step_00000004.png"]
    from PIL import Image

    with Image.open(out / "validation" / pngs[0]) as im:  # 2 prompts x 2 seeds of 64 px, shown at 128 px + padding
        assert im.size == (2 * 128 + 3 * 4, 2 * 128 + 3 * 4)
    rows = read_scores(out / "validation" / "scores.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4] and all(set(r) >= {"pickscore", "aesthetic", "alarm"} for r in rows)
    best = json.loads((out / "validation" / "best.json").read_text())
    assert best["value"] == max(r["pickscore"] for r in rows) and best["select"] == "pickscore"
    assert (out / "export-best" / "adapter_model.safetensors").is_file() and (out / "export" / "SHA256SUMS").is_file()

    scalars, images, tensors = tb_events(out)
    metrics = read_metrics(out / "metrics.jsonl")
    assert scalars["loss"] == [(m["step"] + 1, pytest.approx(m["loss"])) for m in metrics]  # one point per row
    assert {"grad_norm", "lr", "time/rollout", "field/compose"} <= set(scalars)
    assert [s for s, _ in scalars["validation/pickscore"]] == [0, 2, 4]
    assert [v for _, v in scalars["validation/aesthetic"]] == pytest.approx([r["aesthetic"] for r in rows])
    assert [s for s, _ in scalars["validation/alarm"]] == [0, 2, 4]
    assert images == {"validation/samples": [0, 2, 4]}
    assert any(t.startswith("config") for t in tensors)  # the resolved config as text


@pytest.mark.slow  # two process starts + 8 toy steps: 49 s on 2 idle cores, 204 s at load average 9
def test_killed_and_resumed_run_keeps_one_curve(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "toy.toml"),
           "--output-dir", str(out)]
    for s in ["report.enabled=false", "report.eval_every=0", "experiment.variants={}", "train.steps=6",
              "train.save_every=2", "train.prompts_per_step=2", "rollout.group_size=1", "rollout.steps=3",
              "opd.query_states=1", "validation.every=2", "validation.steps=3", "validation.seeds=[0]",
              'validation.prompts=["[compose] a red square", "[text] the number 42", "[aesthetic] a dusk sky over '
              'the sea"]', 'validation.scorers={"toy:task" = "", "toy:quality" = ""}', 'validation.select="toy:task"',
              'validation.alarm_quality="toy:quality"', 'validation.alarm_reward="toy:task"']:
        cmd += ["--set", s]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set by an in-process run
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # killed while writing checkpoint 4: after step 4's validation and tracker flush, so the resumed run (from
    # checkpoint 2) recomputes points the killed run had already logged
    killed = subprocess.run(cmd, env={**env, "FLOWOPD_FAULT": "ckpt.write@4=kill"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = {r["step"]: r for r in read_scores(out / "validation" / "scores.jsonl")}
    assert sorted(before) == [0, 2, 4]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(6))
    rows = read_scores(out / "validation" / "scores.jsonl")
    lines = (out / "validation" / "scores.jsonl").read_text().splitlines()
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and len(lines) == 4  # one line per validation
    assert rows[2] == before[4]  # recomputed bit for bit after the resume
    scalars, images, _ = tb_events(out)
    assert scalars["loss"] == [(m["step"] + 1, pytest.approx(m["loss"])) for m in metrics]
    assert [s for s, _ in scalars["validation/toy:task"]] == [0, 2, 4, 6]
    assert images["validation/samples"] == [0, 2, 4, 6]
    best = json.loads((out / "validation" / "best.json").read_text())
    assert best["value"] == max(r["toy:task"] for r in rows)
    assert (out / "export-best" / "adapter_config.json").is_file()


def test_alarm_fires_when_quality_falls_while_the_reward_rises() -> None:
    hist = [{"step": 0, "q": 0.50, "r": 0.2}, {"step": 10, "q": 0.60, "r": 0.4}]
    assert alarm(hist, {"step": 20, "q": 0.55, "r": 0.6}, "q", "r", 0.1) is None  # fell 8%: under the threshold
    msg = alarm(hist, {"step": 20, "q": 0.50, "r": 0.6}, "q", "r", 0.1)
    assert msg is not None and "q fell 17% (from 0.6 at step 10 to 0.5)" in msg and "r rose from 0.4 to 0.6" in msg
    assert alarm(hist, {"step": 20, "q": 0.40, "r": 0.3}, "q", "r", 0.1) is None  # both fell: not reward hacking
    assert alarm([], {"step": 0, "q": 0.5, "r": 0.2}, "q", "r", 0.1) is None


def test_wandb_tracker_offline_one_id_per_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    class Run:
        summary: dict = {}

        def log(self, data: dict, step: int) -> None:
            calls.append(("log", (data, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(),
                                 Image=lambda a: ("img", a.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from engine.eval.trackers import build_trackers

    t = build_trackers(tmp_path, False, True, "proj", "offline", {"a.b": 1}, start_step=0)
    t.scalars({"loss": 0.5, "bad": float("nan")}, 3)
    t.close()
    build_trackers(tmp_path, False, True, "proj", "offline", {}, start_step=3).close()
    inits = [kw for name, kw in calls if name == "init"]
    assert inits[0]["mode"] == "offline" and inits[0]["resume"] == "allow" and inits[0]["config"] == {"a.b": 1}
    assert inits[0]["id"] == inits[1]["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert ("log", ({"loss": 0.5, "bad": None}, 3)) in calls


def test_validation_and_tracking_keys_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "configs" / "tiny.toml", [
            f'output_dir="{out}"', "validation.every=-1", "validation.cfg_scale=nan", "validation.alarm_drop=1.5",
            'validation.scorers={nope="", pickscore="/no/pickscore", deqa="/not/a/url"}', 'validation.select="x"',
            'validation.alarm_quality="deqa"', 'tracking.wandb_mode="sometimes"'], paths=True)
    text = str(exc.value)
    for expected in ["validation.every = -1; must be >= 0", "validation.cfg_scale = nan; must be a finite number",
                     "validation.alarm_drop = 1.5; must be in (0, 1)",
                     "validation.scorers.nope: unknown scorer; valid:",
                     "validation.select = 'x'; valid: deqa, nope, pickscore, average",
                     "validation: the alarm needs both alarm_quality and alarm_reward",
                     "tracking.wandb_mode = 'sometimes'; valid: offline, online"]:
        assert expected in text, expected
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "configs" / "tiny.toml", [
            f'output_dir="{out}"', "validation.every=5", 'validation.prompts=["a"]',
            'validation.scorers={pickscore="/no/pickscore", deqa="/not/a/url"}'], paths=True)
    assert "validation.scorers.pickscore: scorer weights not found: /no/pickscore" in str(exc.value)
    assert "validation.scorers.deqa = '/not/a/url': expected the reward server's http:// URL" in str(exc.value)
    assert not out.exists()
    with pytest.raises(ConfigError, match="'average' is the Flow-OPD card's average: it needs one of"):
        load_config(REPO / "configs" / "tiny.toml", ["validation.every=5", 'validation.prompts=["a"]',
                                                     'validation.scorers={"toy:task" = ""}',
                                                     'validation.select="average"'])
