"""The model-family seam: a family defined only in tests/ (tests/fake_backend.py) trains end to end through the
unchanged engine (rollout, fields with CFG, loss, checkpoint, resume, export), and no engine file names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends import families, get_backend, register_backend
from engine.backends.base import ModelBackend
from engine.config import ConfigError, load_config
from engine.fields import Field, PeftFieldEvaluator
from engine.fields.rows import plan_rows
from tests.fake_backend import FakeBackend, FakeCond, TinyMixer

REPO = Path(__file__).resolve().parents[1]
FAKE = [
    "model.family=fake", "model.preset=fake-tiny", "student.rank=2", "student.alpha=2.0",
    "teachers.0.rank=2", "teachers.1.rank=2", "rollout.steps=3", "rollout.group_size=1",
    "train.steps=3", "train.save_every=2",
]


@pytest.fixture(autouse=True)
def _fake_family() -> None:
    register_backend(FakeBackend())


def _config(out: Path, extra: list[str] = ()):
    return load_config(REPO / "configs" / "tiny.toml", [*FAKE, *extra, f'output_dir="{out}"'])


def test_fake_family_is_a_backend_and_listed() -> None:
    assert isinstance(get_backend("fake"), ModelBackend) and "fake" in families() and "sd3" in families()
    with pytest.raises(KeyError, match="valid: .*sd3"):
        get_backend("nope")


def test_config_takes_the_familys_defaults_and_checks(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "run")
    assert cfg.student.targets == ["to_in", "to_mid"]  # the family's default LoRA targets
    with pytest.raises(ConfigError, match="model.preset = 'tiny'; valid: fake-tiny"):
        load_config(REPO / "configs" / "tiny.toml", ["model.family=fake"])
    with pytest.raises(ConfigError, match="model.family = 'nope'"):
        load_config(REPO / "configs" / "tiny.toml", ["model.family=nope"])


def test_uncond_twin_keeps_what_the_family_says() -> None:
    model = TinyMixer()
    enc = FakeBackend().text_encoder("builtin", FakeBackend().preset_spec("fake-tiny"), 0)
    cond, uncond = enc.encode(["abc", "de"]), enc.encode([""])
    field = Field("g", None, 3.0)
    plan = plan_rows([field, field])
    x, sigma, rows = plan.inputs(torch.randn(2, 2, 4, 4), torch.rand(2), cond, uncond)
    assert len(rows) == 4 and plan.uncond == [True, True, False, False]
    assert torch.equal(rows.keep[:2], cond.keep) and torch.equal(rows.tokens[:2], uncond.tokens.expand(2, -1, -1))
    v = PeftFieldEvaluator(model, FakeBackend().velocity, [field], uncond).field_velocity(field, x[2:], sigma[2:],
                                                                                          cond)
    vu = FakeBackend().velocity(model, x[2:], sigma[2:], FakeCond(uncond.tokens.expand(2, -1, -1), cond.keep))
    vc = FakeBackend().velocity(model, x[2:], sigma[2:], cond)
    torch.testing.assert_close(v, vu + 3.0 * (vc - vu))


@pytest.mark.slow
def test_fake_family_trains_resumes_and_exports(tmp_path: Path) -> None:
    from engine.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(_config(out))
    try:
        rows = trainer.train()
    finally:
        trainer.close()
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "export" / "adapter_model.safetensors").is_file()
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()
    again = Trainer(_config(out, ["train.steps=4"]))
    try:
        assert again.start_step == 3
        again.train()
    finally:
        again.close()


def test_no_engine_file_names_the_test_family() -> None:
    hits = [p for p in (REPO / "engine").rglob("*.py") if "fake" in p.read_text().lower()]
    assert hits == []
