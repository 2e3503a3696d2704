"""The toy world: prompt grammar, renderer, analytic rewards and the text encoder (no trained weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.worlds.toy import rewards
from engine.worlds.toy.encoder import ToyTextEncoder
from engine.worlds.toy.world import (
    BASE_TASK_MIX,
    COLORS,
    DEGRADATIONS,
    PLACES,
    TASKS,
    TIMES,
    VOCAB,
    ComposeSpec,
    Obj,
    SceneSpec,
    TextSpec,
    all_specs,
    base_example,
    clean_example,
    degrade,
    eval_prompts,
    parse_prompt,
    perturb,
    prompt_of,
    render,
    sample_spec,
    task_of,
    train_prompts,
)


def _clean(task: str, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    ex = [clean_example(task, rng) for _ in range(n)]
    return [p for p, _ in ex], np.stack([x for _, x in ex])


# ------------------------------------------------------------------------------------------------- world


@pytest.mark.parametrize("task", TASKS)
def test_prompt_grammar_round_trips(task: str) -> None:
    for spec in all_specs(task):
        p = prompt_of(spec)
        assert parse_prompt(p) == spec and task_of(p) == task
        assert all(w in VOCAB for w in p.split() if not w.isdigit())


def test_parse_rejects_outside_grammar() -> None:
    for bad in ("[compose] a purple square", "[text] the number 7", "a red square", "[compose] a red square left of "
                "a red square", "[aesthetic] a noon sky over the moon"):
        with pytest.raises(ValueError):
            parse_prompt(bad)
    with pytest.raises(ValueError):
        task_of("[draw] a red square")


def test_prompt_sets_fixed_and_disjoint() -> None:
    assert eval_prompts() == eval_prompts()
    assert len(eval_prompts("compose")) == 18 and len(eval_prompts("text")) == 16
    for task in ("compose", "text"):
        assert not set(eval_prompts(task)) & set(train_prompts(task))
        assert set(eval_prompts(task)) | set(train_prompts(task)) == {prompt_of(s) for s in all_specs(task)}
    kinds = [parse_prompt(p).kind for p in eval_prompts("compose")]
    assert {k: kinds.count(k) for k in set(kinds)} == {"single": 2, "count": 4, "position": 12}


@pytest.mark.parametrize("task", TASKS)
def test_render_deterministic_in_range(task: str) -> None:
    a = _clean(task, 20, seed=3)
    b = _clean(task, 20, seed=3)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[1].shape == (20, 3, 16, 16) and a[1].dtype == np.float32
    assert a[1].min() >= -1.0 and a[1].max() <= 1.0


def test_perturb_changes_spec_and_base_mixture() -> None:
    rng = np.random.default_rng(0)
    for task in TASKS:
        for _ in range(200):
            spec = sample_spec(task, rng)
            other = perturb(spec, rng)
            assert other != spec and type(other) is type(spec)
            prompt_of(other)  # still inside the grammar
    tasks = [task_of(base_example(rng)[0]) for _ in range(800)]
    assert all(abs(tasks.count(t) / 800 - p) < 0.06 for t, p in zip(TASKS, BASE_TASK_MIX))


# ----------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("task", TASKS)
def test_rewards_near_one_on_ground_truth(task: str) -> None:
    prompts, x = _clean(task, 120)
    r = rewards.task_reward(x, prompts)
    q = rewards.quality(x)
    assert r.min() == pytest.approx(1.0)
    assert q.mean() > 0.97 and q.min() > 0.85
    row = rewards.score_row(torch.from_numpy(x), prompts)
    assert row[task] == pytest.approx(1.0) and row["average"] > 0.98


@pytest.mark.parametrize("task", TASKS)
def test_rewards_near_zero_on_noise(task: str) -> None:
    prompts, x = _clean(task, 100)
    gen = np.random.default_rng(1)
    for noise in (np.clip(gen.standard_normal(x.shape), -1, 1), gen.uniform(-1, 1, x.shape)):
        assert rewards.task_reward(noise, prompts).mean() < 0.02
        assert rewards.quality(noise).max() < 0.02


def _wrong(spec, rng: np.random.Generator):
    """A spec sharing no attribute the reward looks at (colours, digits, time and place all differ)."""
    if isinstance(spec, ComposeSpec):
        unused = [c for c in COLORS if c not in {o.color for o in spec.objects}]
        recolor = {c: unused[i] for i, c in enumerate(dict.fromkeys(o.color for o in spec.objects))}
        return ComposeSpec(tuple(Obj(recolor[o.color], o.shape) for o in spec.objects), spec.relation)
    if isinstance(spec, TextSpec):
        shifted = [str((int(d) + 5) % 10) for d in spec.digits]
        return TextSpec("".join(["1" if shifted[0] == "0" else shifted[0], shifted[1]]))
    return SceneSpec(next(t for t in TIMES if t != spec.time), next(p for p in PLACES if p != spec.place))


@pytest.mark.parametrize("task", TASKS)
def test_rewards_near_zero_on_wrong_renders(task: str) -> None:
    rng = np.random.default_rng(2)
    prompts, _ = _clean(task, 100)
    wrong = np.stack([render(_wrong(parse_prompt(p), rng), rng) for p in prompts])
    for p, w in zip(prompts, wrong):
        spec = parse_prompt(p)
        if isinstance(spec, TextSpec):
            reading, _ = rewards.read_digits(w)
            assert all(a != b for a, b in zip(reading, spec.digits))
    assert rewards.task_reward(wrong, prompts).max() < 0.05


@pytest.mark.parametrize("task", TASKS)
def test_one_attribute_wrong_gets_partial_credit(task: str) -> None:
    rng = np.random.default_rng(4)
    prompts, _ = _clean(task, 100)
    x = np.stack([render(perturb(parse_prompt(p), rng), rng) for p in prompts])
    r = rewards.task_reward(x, prompts)
    assert r.max() < 1.0  # every perturbation is seen by the reward
    if task != "aesthetic":  # a wrong sky or ground is a large L1 error: no credit (checked below)
        assert 0.3 < r.mean() < 0.8


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_quality_penalises_each_degradation(kind: str) -> None:
    rng = np.random.default_rng(5)
    for task in TASKS:
        _, x = _clean(task, 40)
        d = np.stack([degrade(img, rng, kind=kind) for img in x])
        assert rewards.quality(d).mean() < 0.3, (task, kind)


def test_compose_detection_and_relations() -> None:
    rng = np.random.default_rng(6)
    spec = parse_prompt("[compose] a red square left of a blue square")
    img = render(spec, rng)
    objs = rewards.detect_objects(img)
    assert sorted((o["color"], o["shape"]) for o in objs) == [("blue", "square"), ("red", "square")]
    swapped = render(ComposeSpec(spec.objects, "right of"), rng)
    assert rewards.compose_score(swapped, spec) == pytest.approx(0.75)  # all but the relation
    three = parse_prompt("[compose] three green squares")
    two = render(parse_prompt("[compose] two green squares"), rng)
    assert rewards.compose_score(two, three) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    ragged = img.copy()
    ragged[:, ::2, ::2] = 0.0  # holes: the components no longer fill their boxes
    assert {o["shape"] for o in rewards.detect_objects(ragged)} == {"blob"}
    assert rewards.compose_score(ragged, spec) == pytest.approx(0.75)  # all but the shape


def test_task_reward_checks_lengths() -> None:
    with pytest.raises(ValueError):
        rewards.task_reward(np.zeros((2, 3, 16, 16)), ["[text] the number 12"])
    with pytest.raises(ValueError):
        rewards.quality(np.zeros((2, 16, 16)))


# ----------------------------------------------------------------------------------------------- encoder


def test_encoder_interface_and_determinism(tmp_path) -> None:
    torch.manual_seed(0)
    enc = ToyTextEncoder()
    prompts = ["[text] the number 37", "", "[compose] a red square left of a blue square", "[text] the number 73"]
    a, b = enc.encode(prompts), enc.encode(list(prompts))
    assert a.prompt_embeds.shape == (4, enc.seq_len, enc.dim) and a.pooled.shape == (4, enc.pooled_dim)
    assert a.prompt_embeds.dtype == torch.float32 and a.pooled.dtype == torch.float32
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(a.pooled, b.pooled)
    # batch composition does not change a prompt's embedding
    single = enc.encode([prompts[2]])
    torch.testing.assert_close(single.prompt_embeds[0], a.prompt_embeds[2], rtol=0, atol=1e-6)
    # digit order matters (numbers are split into digit tokens with positions)
    assert not torch.allclose(a.prompt_embeds[0], a.prompt_embeds[3])
    assert enc.tokenize(["[text] the number 37"])[0, 3:5].tolist() == [enc.index["3"], enc.index["7"]]
    assert enc.tokenize([""]).eq(0).all() and enc.tokenize(["zebra"])[0, 0] == 1
    enc.save_pretrained(tmp_path / "enc")
    back = ToyTextEncoder.from_pretrained(tmp_path / "enc")
    c = back.encode(prompts)
    assert torch.equal(c.prompt_embeds, a.prompt_embeds) and torch.equal(c.pooled, a.pooled)
    assert not any(p.requires_grad for p in back.parameters())
