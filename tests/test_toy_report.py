"""The embedded default: both OPD students of the miniature world and their report (engine.experiment,
engine.worlds.toy.report), shortened to a few steps; the target checks; resuming a finished default run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, variant_config
from engine.metrics import read_metrics
from engine.train import main
from engine.worlds.toy.report import REWARDS_FILE, Row, check_targets, read_curve
from engine.worlds.toy.rewards import COLUMNS

DANCE = "OPD student (DanceOPD: low-noise MSE)"
# The default's own rows and files, with every run cut to 2 steps of 4 images and 1 sample per eval prompt.
SHORT = ["train.steps=2", "train.prompts_per_step=2", "rollout.group_size=2", "train.save_every=1",
         "report.eval_every=1", "report.samples_per_prompt=1",
         f'experiment.variants."{DANCE}"=["opd.loss=mse", "rollout.sampler=ode", "opd.routing=step", '
         f'"opd.query_states=1", "opd.query_bias=low", "opd.query_candidates=all", "opd.beta=0.0", '
         f'"opd.anchor=\'\'", "train.steps=2"]']


def _args(out: Path) -> list[str]:
    return ["--output-dir", str(out), *sum((["--set", s] for s in SHORT), [])]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(_args(out)) == 0
    return out


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", line)
        if m:
            rows[m.group(1)] = [float(m.group(i)) for i in range(2, 7)]
    return rows


def test_default_run_writes_the_table_samples_and_curves(demo: Path) -> None:
    report = (demo / "report.md").read_text()
    rows = _table(report)
    assert list(rows) == ["base", "expert: compose", "expert: text", "expert: aesthetic", "merge (average)",
                          "merge (SVD)", "OPD student (Flow-OPD: transition KL)", DANCE]
    data = json.loads((demo / "report.json").read_text())
    assert data["columns"] == list(COLUMNS)
    for name, cells in rows.items():
        assert cells == pytest.approx([round(data["rows"][name][c]["mean"], 3) for c in COLUMNS], abs=6e-4)
        assert all(0.0 <= v <= 1.0 for v in cells)
    assert "Targets (" in report and len(data["targets"]) == report.count("- [")
    for png in ("samples.png", "rewards.png"):
        assert (demo / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    main_cfg = load_config(demo / "config.toml")
    for run in (main_cfg, variant_config(main_cfg, DANCE)):
        d = Path(run.output_dir)
        assert (d / "export" / "adapter_model.safetensors").is_file(), d
        assert [m["step"] for m in read_metrics(d / "metrics.jsonl")] == [0, 1]
        curve = read_curve(d / REWARDS_FILE)
        assert [p["step"] for p in curve] == [0, 1, 2]  # the cold start, then after each step
        assert set(COLUMNS) <= set(curve[0])
    # the variant really is DanceOPD: MSE on velocities (no transition KL terms, no anchor)
    dance = read_metrics(Path(variant_config(main_cfg, DANCE).output_dir) / "metrics.jsonl")
    flow = read_metrics(demo / "metrics.jsonl")
    assert "anchor" in flow[0] and "anchor" not in dance[0]
    # ... with G=1 routing: one expert per step
    assert all(len([k for k in m if k.startswith("field/")]) == 1 for m in dance)


def test_rerunning_the_finished_default_repeats_no_step_and_reproduces_the_table(demo: Path) -> None:
    before = {p: p.read_text() for p in demo.rglob("metrics.jsonl")}
    table = _table((demo / "report.md").read_text())
    assert main(_args(demo)) == 0
    assert {p: p.read_text() for p in demo.rglob("metrics.jsonl")} == before
    assert _table((demo / "report.md").read_text()) == table  # eval is deterministic: same rows again


def test_variant_problems_are_named_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f'experiment.variants."{DANCE}"=["opd.loss=l2", "output_dir=/x"]',
                           'experiment.variants.B=["rollout.steps=1"]'])
    text = str(err.value)
    assert f"experiment.variants.'{DANCE}': ['output_dir=/x'] cannot be overridden" in text
    assert "experiment.variants.'B': rollout.steps = 1; must be >= 2" in text
    with pytest.raises(ConfigError, match="need data.encoder = 'toy'"):
        load_config(None, ["data.encoder=builtin"])
    assert main(["--output-dir", str(tmp_path / "o"), "--set", 'experiment.variants.B=["student.rank=0"]']) == 2
    assert not (tmp_path / "o").exists()


def _row(name: str, kind: str, values: list[float]) -> Row:
    return Row(name, kind, {c: {"mean": v, "std": 0.0} for c, v in zip(COLUMNS, values)})


def test_target_checks_follow_the_routes() -> None:
    cfg = load_config(None)
    rows = [
        _row("base", "base", [0.5, 0.6, 0.4, 0.5, 0.5]),
        _row("expert: compose", "expert", [0.8, 0.3, 0.4, 0.5, 0.5]),
        _row("expert: text", "expert", [0.4, 1.0, 0.3, 0.5, 0.55]),
        _row("expert: aesthetic", "expert", [0.5, 0.6, 0.9, 0.5, 0.625]),
        _row("merge (SVD)", "merge", [0.6, 0.8, 0.6, 0.6, 0.65]),
        _row("student", "student", [0.73, 0.95, 0.80, 0.7, 0.795]),
    ]
    got = {t["target"]: t["ok"] for t in check_targets(cfg, rows)}
    assert got["expert compose beats the base on compose"]
    assert got["expert text is worse than the base on another task"]
    assert not got["expert aesthetic is worse than the base on another task"]  # ties are not worse
    assert got["student: average beats merge (SVD)"] and got["student: average beats expert: aesthetic"]
    assert got["student: >= 90% of expert compose on compose"]  # 0.73 >= 0.72
    assert got["student: >= 90% of expert text on text"]
    assert not got["student: >= 90% of expert aesthetic on aesthetic"]  # 0.80 < 0.81
    assert len(got) == 3 * 2 + 4 + 3


def test_variants_need_the_report() -> None:
    with pytest.raises(ConfigError, match="experiment.variants are trained for the report's table"):
        load_config(None, ["report.enabled=false"])


@pytest.mark.slow
def test_a_short_opd_run_moves_the_rewards_toward_the_experts(tmp_path: Path) -> None:
    """20 DanceOPD steps of 16 images from the SVD-merge cold start: the student's quick-subset rewards move up
    where the merge is furthest below the experts (aesthetic: ~0.53 -> expert ~0.9) and on average."""
    out = tmp_path / "run"
    steps = 20
    assert main(["--output-dir", str(out), "--set", "report.enabled=false", "--set", "experiment.variants={}",
                 "--set", f"report.eval_every={steps}", "--set", f"train.steps={steps}", "--set", "train.save_every=0",
                 "--set", "train.prompts_per_step=4", "--set", "train.lr=2e-3", "--set", "opd.loss=mse",
                 "--set", "rollout.sampler=ode", "--set", "opd.query_states=1", "--set", "opd.query_bias=low",
                 "--set", "opd.beta=0.0"]) == 0
    start, end = read_curve(out / REWARDS_FILE)
    assert (start["step"], end["step"]) == (0, steps)
    assert end["aesthetic"] > start["aesthetic"] + 0.05, (start, end)
    assert end["average"] > start["average"], (start, end)
