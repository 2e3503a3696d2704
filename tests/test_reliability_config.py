"""Property-based tests over the config space (hypothesis):
- every invalid config is rejected before any work starts, with a message naming each bad key;
- every config that is accepted starts: Trainer construction and one optimizer step on the `tiny` preset."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.adapters.lora import DEFAULT_TARGETS
from engine.config import Config, ConfigError, load_config
from engine.config import opd as O
from engine.config import schema as C
from engine.ops import BACKENDS
from engine.train import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


def scalar_keys() -> dict[str, typing.Any]:
    """Every non-table key of the config (dotted path -> type), read from the dataclasses, so keys added later
    are covered too; list items via the tiny preset's first teacher and field."""
    keys: dict[str, typing.Any] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], f"{prefix}{f.name}.0.")
            else:
                keys[f"{prefix}{f.name}"] = tp

    walk(Config, "")
    return keys


KEYS = scalar_keys()


def wrong_type(tp: typing.Any) -> st.SearchStrategy[str]:
    """A TOML literal of a type the key does not accept."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return st.sampled_from(["1", '"yes"', "[true]"])
    if tp in (int, float):
        return st.sampled_from(['"3"', "true", "[1]"] + (["2.5"] if tp is int else []))
    if tp is str:
        return st.sampled_from(["1", "true", '["x"]'])
    if origin is list:
        return st.sampled_from(['"x"', "1", "{ a = 1 }"])
    if origin is dict:
        return st.sampled_from(['"x"', "[1]", "2"])
    raise AssertionError(tp)


def _choice(valid: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=8).filter(lambda v: v not in valid).map(
        lambda v: f'"{v}"')


# values each key's validation must refuse (besides wrong types), as TOML literals
NEG = st.integers(-5, 0).map(str)
NONPOS_F = st.floats(-10, 0).map(repr)
NEG_F = st.floats(-10, -1e-3).map(repr)
BAD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "output_dir": st.just('""'),
    "model.preset": _choice(tuple(__import__("engine.backends.sd3.presets", fromlist=["PRESETS"]).PRESETS)),
    "model.dtype": _choice(C.DTYPES), "model.attention": _choice(C.ATTENTION),
    "model.attention_backend": _choice(C.ATTENTION_BACKENDS),
    "model.latent_size": st.sampled_from(["-2", "3", "7", "18", "64"]),
    "student.rank": NEG, "student.alpha": NONPOS_F, "student.targets": st.just("[]"),
    "student.init": _choice(C.LORA_INITS),
    "teachers.0.name": st.sampled_from(['""', '"base"', '"student"', '"text_expert"']),
    "teachers.0.rank": NEG, "teachers.0.alpha": NEG_F,
    "fields.0.source": st.sampled_from(['"ghost"', '"compose"']), "fields.0.cfg_scale": NEG_F,
    "fields.0.name": st.sampled_from(['""', '"text"', '"student"']),
    "init.merge": _choice(C.MERGES), "init.teachers": st.just('["nobody"]'),
    "data.prompts": st.just('""'), "data.max_sequence_length": NEG,
    "rollout.steps": st.sampled_from(["1", "0", "-3"]), "rollout.shift": NONPOS_F,
    "rollout.sampler": _choice(C.SAMPLERS), "rollout.noise_level": NONPOS_F, "rollout.cfg_scale": NEG_F,
    "rollout.group_size": NEG,
    "opd.loss": _choice(C.LOSSES), "opd.routing": _choice(C.ROUTINGS), "opd.query_bias": _choice(C.QUERY_BIAS),
    "opd.evaluator": _choice(C.FIELD_EVALUATORS), "opd.epoch_steps": NEG, "opd.anchor": st.just('"nope"'),
    "opd.beta": NEG_F, "opd.query_states": st.sampled_from(["-1", "6", "40"]), "opd.student_cfg": NEG_F,
    "opd.clip_range": NONPOS_F, "opd.adv_clip": NONPOS_F,
    "opd.routes": st.just('{ compose = "ghost" }'), "opd.weights": st.just('{ ghost = 1.0 }'),
    "opd.query_candidates": _choice(O.QUERY_CANDIDATES), "opd.query_weighting": _choice(O.QUERY_WEIGHTINGS),
    "opd.states": _choice(O.STATE_SOURCES), "opd.offpolicy_endpoint": _choice(O.OFFPOLICY_ENDPOINTS),
    "opd.rkl_pathwise": NEG_F, "opd.grad_diagnostic": st.integers(-5, -1).map(str),
    "opd.route_weights": st.just('{ ghost = 1.0 }'), "opd.epoch_counts": st.just('{ ghost = 1 }'),
    "train.ema_decay": st.sampled_from(["1.0", "1.5", "-0.1"]), "train.ema_every": NEG, "train.ema_repeats": NEG,
    **{f"train.{k}": NEG for k in ("steps", "prompts_per_step", "grad_accum", "log_every", "keep_checkpoints",
                                   "max_nonfinite")},
    "train.lr": NONPOS_F, "train.weight_decay": NEG_F, "train.eps": NONPOS_F,
    "train.betas": st.sampled_from(["[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]", "[0.9, 0.99, 0.9]"]),
    "train.warmup_steps": st.integers(-5, -1).map(str), "train.grad_clip": NEG_F,
    "train.save_every": st.integers(-5, -1).map(str),
    "train.profile_steps": st.sampled_from(['"5"', '"3:1"', '"a:b"', '"-1:2"']),
    "kernels.backends.sde_step": _choice(BACKENDS), "kernels.default": _choice(BACKENDS),
    "train.step_timeout": st.sampled_from(["-2.0", "-0.5"]),
    # seeds are [0, 2^63) (engine/config/checks.py SEED_LIMIT); a teacher's -1 means "load from path"
    "model.init_seed": st.sampled_from(["-1", "-7"]), "train.seed": st.sampled_from(["-1", "-7"]),
    "teachers.0.random_seed": st.sampled_from(["-2", "-9"]), "report.seeds": st.sampled_from(["[-1]", "[0, -3]"]),
}
FLOAT_KEYS = sorted(k for k, tp in KEYS.items() if tp is float)
# non-finite items of list and table keys, as TOML literals the tiny config would otherwise accept
NONFINITE_ITEMS = {"train.betas": ["[nan, 0.999]", "[0.9, inf]"], "init.weights": ["[nan, 1.0]", "[1.0, -inf]"],
                   "data.task_weights": ["{ compose = nan, text = 1.0 }"], "opd.weights": ["{ compose = inf }"]}
INT_KEYS = sorted(k for k, tp in KEYS.items() if tp is int)


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, str, str]:
    """(dotted key the message must name, `--set` assignment, kind): a wrong type, an impossible value or a typo."""
    kind = draw(st.sampled_from(["type", "value", "unknown", "nonfinite", "overflow"]))
    if kind == "nonfinite":  # NaN and infinities of every float key and float item
        key = draw(st.sampled_from(FLOAT_KEYS + sorted(NONFINITE_ITEMS)))
        value = draw(st.sampled_from(NONFINITE_ITEMS.get(key, ["nan", "inf", "-inf"])))
        return key, f"{key}={value}", kind
    if kind == "overflow":  # integers TOML cannot hold (tomllib accepts them)
        key = draw(st.sampled_from(INT_KEYS))
        return key, f"{key}={draw(st.sampled_from([str(1 << 63), str(1 << 64), str(-(1 << 63) - 1)]))}", kind
    if kind == "unknown":
        section = draw(st.sampled_from(["", "model.", "student.", "rollout.", "opd.", "train.", "kernels."]))
        name = draw(st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True).filter(
            lambda n: f"{section}{n}" not in KEYS and section + n not in ("model", "student", "rollout", "opd")))
        return f"{section}{name}", f"{section}{name}=1", kind
    if kind == "value":
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        return key, f"{key}={draw(BAD_VALUES[key])}", kind
    key = draw(st.sampled_from(sorted(KEYS)))
    return key, f"{key}={draw(wrong_type(KEYS[key]))}", kind


# an impossible value of these keys is judged against others (query_states against rollout.steps, ...): when one
# of those is broken too, the check cannot know the intended value, so it is only required to reject the config
DEPENDS = {"opd.query_states": {"rollout.steps"}, "model.latent_size": {"model.preset", "model.path"},
           "rollout.noise_level": {"rollout.sampler"}}


def _named(key: str, text: str) -> bool:
    if key.startswith(("teachers.0.", "fields.0.")):  # list items are reported as teachers[0].rank
        section, _, rest = key.split(".", 2)
        return f"{section}[0].{rest}" in text or f"{section}[0] " in text
    return key in text


@settings(max_examples=10 * int(os.environ.get("FLOWOPD_HYPOTHESIS_EXAMPLES", "15")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation(), min_size=1, max_size=4, unique_by=lambda m: m[0]))
def test_every_invalid_config_is_rejected_naming_each_bad_key(mutations: list[tuple[str, str, str]]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [m[1] for m in mutations])
    text = str(err.value)
    mutated = {m[0] for m in mutations}
    for i, (key, assignment, kind) in enumerate(mutations):
        if kind == "value" and DEPENDS.get(key, set()) & mutated:
            continue
        if any(key.startswith(later + ".") for later, _, _ in mutations[i + 1:]):
            continue  # a later `--set` of its table replaced the whole table, this key included
        assert _named(key, text), f"{assignment!r} not named in:\n{text}"


def test_it_is_rejected_before_any_work_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--output-dir", str(out), "--set", "student.rank=0", "--set",
                 "model.latent_size=18", "--set", "student.targets=['to_q', 'norm_q']", "--set",
                 "opd.routes={ compose = 'compose' }"]) == 2
    err = capsys.readouterr().err
    assert "student.rank = 0" in err and "model.latent_size = 18" in err
    assert "student.targets: ['norm_q'] match no Linear layer" in err
    assert "opd.routes has no field for task(s) ['text']" in err
    assert not out.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (['data.prompts="{tmp}"'], "data.prompts: {tmp} is a directory"),
    (['model.path="toy:base"', 'data.encoder="builtin"'], "data.encoder = 'builtin' fits only the model presets"),
    (['data.encoder="toy"'], "data.encoder = 'toy': the 'toy' world's encoder gives prompt embeddings 64 wide and "
                             "pooled embeddings 64 wide; the model (preset 'tiny') takes joint_attention_dim = 32"),
    (['data.encoder="{tmp}"'], "data.encoder = '{tmp}': SD3 pipeline dir {tmp} has no text_encoder/"),
    (["student.rank=33"], "student.rank = 33; must be <= 32"),
    (["teachers.1.rank=40"], "teachers[1].rank = 40; must be <= 32"),
    (["train.lr=inf", "fields.1.cfg_scale=nan"], "train.lr = inf; must be a finite number"),
    (["model.init_seed=18446744073709551616"], "model.init_seed = 18446744073709551616; does not fit in 64 bits"),
])
def test_inputs_that_crashed_at_run_time_are_refused_up_front(tmp_path: Path, overrides: list[str],
                                                              message: str) -> None:
    """Each of these gave a traceback or a bare matmul error after start-up before; now exit 2, nothing written."""
    out = tmp_path / "run"
    sets = [o.format(tmp=tmp_path) for o in overrides]
    assert main(["--config", str(TINY), "--output-dir", str(out), *sum((["--set", o] for o in sets), [])]) == 2
    with pytest.raises(ConfigError, match=re.escape(message.format(tmp=tmp_path))):
        load_config(TINY, sets, paths=True)
    assert not out.exists()


def test_an_empty_output_dir_flag_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(TINY), "--output-dir", ""]) == 2
    assert "output_dir is empty" in capsys.readouterr().err


def test_environment_checks_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.dtype='float16'", "data.prompts='builtin:nothing'", "init.merge='average'",
                           "teachers.0.rank=3"], paths=True)
    text = str(err.value)
    if not __import__("torch").cuda.is_available():
        assert "model.dtype = 'float16' needs a CUDA device" in text
    assert "data.prompts = 'builtin:nothing': unknown builtin prompt set" in text
    assert "init.merge = 'average' averages A and B, so merged teachers need student.rank = 4: compose_expert" in text


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is ~10x faster than two on a shared 2-core machine (measured 0.06 s vs
    0.8 s per step under load), and every run compared here uses the same count, so bit-exactness holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------- valid configs start

FIELDS = ["compose", "text", "base"]


@st.composite
def config_overrides(draw: st.DrawFn) -> list[str]:
    """A broad draw over the tiny preset's config space (mostly valid; invalid draws must then be rejected)."""
    steps = draw(st.integers(2, 4))
    rank = draw(st.integers(1, 6))
    teacher_rank = st.one_of(st.just(rank), st.just(rank), st.just(rank), st.integers(1, 6))  # mostly = rank
    loss = draw(st.sampled_from(C.LOSSES))
    routing = draw(st.sampled_from(C.ROUTINGS))
    routes = {"compose": draw(st.sampled_from(FIELDS)), "text": draw(st.sampled_from(FIELDS))}
    weights = {f: draw(st.floats(0.1, 2.0)) for f in draw(st.sets(st.sampled_from(FIELDS), min_size=1))}
    targets = draw(st.lists(st.sampled_from(DEFAULT_TARGETS + ("ff.net.0.proj", "ff_context.net.2")),
                            min_size=1, max_size=3, unique=True))
    out = [
        f"model.dtype={draw(st.sampled_from(['auto', 'float32', 'bfloat16', 'float16']))!r}",
        f"model.latent_size={draw(st.sampled_from([0, 4, 8, 16]))}",
        f"model.gradient_checkpointing={str(draw(st.booleans())).lower()}",
        f"model.init_seed={draw(st.integers(0, 3))}",
        f"student.rank={rank}", f"student.alpha={draw(st.floats(0.5, 16))}",
        f"student.targets={targets!r}", f"student.init={draw(st.sampled_from(C.LORA_INITS))!r}",
        f"teachers.0.rank={draw(teacher_rank)}", f"teachers.1.rank={draw(teacher_rank)}",
        f"fields.0.cfg_scale={draw(st.floats(0, 4))}",
        f"init.merge={draw(st.sampled_from(C.MERGES))!r}",
        f"rollout.steps={steps}", f"rollout.sampler={draw(st.sampled_from(C.SAMPLERS))!r}",
        f"rollout.noise_level={draw(st.floats(0.05, 1.0))}", f"rollout.cfg_scale={draw(st.floats(0, 4))}",
        f"rollout.group_size={draw(st.integers(1, 2))}", f"rollout.shift={draw(st.floats(0.5, 5))}",
        f"opd.loss={loss!r}", f"opd.routing={routing!r}",
        "opd.routes={ " + ", ".join(f'{k} = "{v}"' for k, v in routes.items()) + " }",
        "opd.weights={ " + ", ".join(f'{k} = {v}' for k, v in weights.items()) + " }",
        f"opd.epoch_steps={draw(st.integers(1, 3))}",
        f"opd.anchor={draw(st.sampled_from(['', *FIELDS]))!r}", f"opd.beta={draw(st.floats(0, 0.2))}",
        f"opd.query_states={draw(st.integers(0, steps - 1))}",
        f"opd.query_bias={draw(st.sampled_from(C.QUERY_BIAS))!r}", f"opd.student_cfg={draw(st.floats(0, 4))}",
        f"opd.evaluator={draw(st.sampled_from(C.FIELD_EVALUATORS))!r}",
        f"train.prompts_per_step={draw(st.integers(1, 3))}", f"train.grad_accum={draw(st.integers(1, 2))}",
        f"train.lr={draw(st.floats(1e-5, 1e-2))}", f"train.warmup_steps={draw(st.integers(0, 2))}",
        f"train.grad_clip={draw(st.sampled_from([0.0, 0.5, 1.0]))}", f"train.seed={draw(st.integers(0, 9))}",
        f"kernels.backends.sde_step={draw(st.sampled_from(BACKENDS))!r}",
        f"kernels.default={draw(st.sampled_from(BACKENDS))!r}",
        "train.steps=1", "train.save_every=0",
    ]
    return out


# FLOWOPD_HYPOTHESIS_EXAMPLES=300 for a deeper search (about 0.15 s per example with one thread)
@settings(max_examples=int(os.environ.get("FLOWOPD_HYPOTHESIS_EXAMPLES", "15")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(config_overrides())
def test_every_accepted_config_starts_and_takes_a_step(overrides: list[str]) -> None:
    from engine.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix="flowopd-hyp-"))
    try:
        try:
            cfg = load_config(TINY, [*overrides, f'output_dir="{out}"'], paths=True)
        except ConfigError as exc:  # rejected up front: fine, as long as nothing started
            assert exc.problems and not any(out.iterdir())
            event(f"rejected: {exc.problems[0][:40]}")
            return
        event("started")
        trainer = Trainer(cfg)
        row = trainer.train_step(0)
        trainer.close()
        assert row["step"] == 0 and "loss" in row
    finally:
        shutil.rmtree(out, ignore_errors=True)
