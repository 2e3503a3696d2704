from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    reference_markdown,
    to_toml,
    variant_config,
)
from engine.train import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    written = tmp_path / "c.toml"
    written.write_text(to_toml(cfg))
    assert load_config(written) == cfg


def test_default_config_is_the_miniature_world() -> None:
    cfg = load_config(None, paths=True)
    assert isinstance(cfg, Config)
    assert cfg.model.path == "toy:base" and cfg.data.encoder == "toy" and cfg.report.enabled
    assert {t.name for t in cfg.teachers} == {"compose", "text", "aesthetic"} and cfg.init.merge != "none"
    assert cfg.opd.anchor and cfg.opd.loss == "gkd"  # Flow-OPD with MAR ...
    (name, _), = cfg.experiment.variants.items()
    dance = variant_config(cfg, name)  # ... and DanceOPD as the variant
    assert (dance.opd.loss, dance.rollout.sampler, dance.opd.query_states, dance.opd.query_bias) == (
        "mse", "ode", 1, "low")
    assert Path(dance.output_dir).parent == Path(cfg.output_dir) / "variants"


def test_every_problem_is_listed_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [
            "model.presett=x",
            "student.rank=0",
            "student.alpha='big'",
            "rollout.steps=1",
            "opd.routes.text='nobody'",
            "opd.loss='l1'",
            "train.lr=-1",
        ])
    problems = err.value.problems
    text = str(err.value)
    assert "unknown key 'model.presett'; valid keys: preset, path" in text
    assert "student.rank = 0; must be > 0" in text
    assert "student.alpha: expected float, got str 'big'" in text
    assert "rollout.steps = 1; must be >= 2" in text
    assert "opd.routes.text = 'nobody': unknown field" in text
    assert "opd.loss = 'l1'; valid: mse, gkd, kl_only" in text
    assert "train.lr = -1.0; must be > 0" in text
    assert len(problems) == 7


def test_unknown_teacher_and_field_references() -> None:
    data = {
        "teachers": [{"name": "a", "random_seed": 1}, {"name": "a", "random_seed": 2}, {"name": "base", "path": "x"}],
        "fields": [{"name": "f", "source": "ghost"}],
        "init": {"merge": "svd", "teachers": ["zzz"]},
        "opd": {"routes": {"t": "f"}, "anchor": "nope"},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    text = str(err.value)
    assert "teachers[1].name = 'a' is used twice" in text
    assert "teachers[2].name = 'base' is reserved" in text
    assert "fields[0].source = 'ghost'; valid: base, a" in text
    assert "init.teachers: unknown teacher 'zzz'" in text
    assert "opd.anchor = 'nope': unknown field" in text


def test_overrides_types_and_list_items() -> None:
    cfg = load_config(TINY, ["train.steps=7", "teachers.1.random_seed=9", "opd.beta=0", "student.targets=['to_q']",
                             "data.prompts=builtin:tiny"])
    assert cfg.train.steps == 7 and cfg.teachers[1].random_seed == 9 and cfg.opd.beta == 0.0
    assert cfg.student.targets == ["to_q"] and cfg.data.prompts == "builtin:tiny"
    with pytest.raises(ConfigError, match="no list item '5'"):
        load_config(TINY, ["teachers.5.rank=3"])
    with pytest.raises(ConfigError, match="expected int, got float"):
        load_config(TINY, ["train.steps=2.5"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(TINY, ["train.steps"])


def test_mode_specific_requirements() -> None:
    with pytest.raises(ConfigError, match="needs rollout.sampler = 'sde'"):
        load_config(TINY, ["opd.loss='kl_only'", "rollout.sampler='ode'"])
    for routing in ("soft", "field_step"):
        with pytest.raises(ConfigError, match="needs opd.weights"):
            load_config(TINY, [f"opd.routing='{routing}'"])
    with pytest.raises(ConfigError, match="needs opd.routes"):
        load_config(TINY, ["opd.routing='step'", "opd.routes={}"])
    with pytest.raises(ConfigError, match=r"opd.route_weights.ghost: no route for this task"):
        load_config(TINY, ["opd.routing='step'", "opd.route_weights={ghost = 1.0}"])
    with pytest.raises(ConfigError, match="rollout.group_size = 1; must be >= 2"):
        load_config(TINY, ["opd.loss='rkl_pg'", "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="needs opd.states = 'on_policy'"):
        load_config(TINY, ["opd.loss='kl_only'", "opd.states='off_policy'"])
    with pytest.raises(ConfigError, match=r"opd.query_states = 7; must be 0 \(dense\) or 1..6"):
        load_config(TINY, ["opd.query_states=7", "opd.query_candidates='all'"])
    load_config(TINY, ["opd.query_states=6", "opd.query_candidates='all'"])  # all T = 6 step inputs
    with pytest.raises(ConfigError, match=r"routed task\(s\) \['ocr'\] have no prompts"):
        load_config(TINY, ["opd.routing='step'", "opd.routes={compose='compose', ocr='text'}"], paths=True)
    with pytest.raises(ConfigError, match="opd.query_states = 9"):
        load_config(TINY, ["opd.query_states=9"])


def test_cli_reports_bad_config_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n[student]\nrank = -2\n")
    assert main(["--config", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.stepz'" in err and "student.rank = -2" in err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_cli_checks_paths_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--set", f"teachers.0.path='{tmp_path}/missing'", "--set", "teachers.0.random_seed=-1",
                 "--set", "data.prompts='/no/such.jsonl'", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "adapter not found" in err and "prompt file not found: /no/such.jsonl" in err


def test_reference_documents_every_key() -> None:
    ref = reference_markdown()
    for key in ("`rank`", "`query_bias`", "`noise_level`", "`profile_steps`", "`cfg_scale`"):
        assert key in ref
