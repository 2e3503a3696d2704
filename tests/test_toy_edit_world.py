"""The editing world: grammar, deterministic renderer and data, analytic rewards (ground truth ~1, noise and wrong
edits ~0), conditioning of examples (an edit row's source stays clean; a dropped prompt keeps it)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.worlds.toy_edit import rewards as R
from engine.worlds.toy_edit import world as W
from engine.worlds.toy_edit.model import conditioning, example_batch, flow_matching_loss, new_encoder, new_transformer

N = 60  # examples per case: 0.3 s of reward code


def test_prompt_grammar_round_trips() -> None:
    specs = [*W.all_t2i_specs(), *(W.LocalEdit(a, b) for a in W.COLORS for b in W.COLORS if a != b),
             *(W.GlobalEdit(t) for t in W.TIMES)]
    for spec in specs:
        assert W.parse_prompt(W.prompt_of(spec)) == spec
        assert W.task_of(W.prompt_of(spec)) == spec.task
    for bad in ("[t2i] a red square and a red square at day", "[local_edit] make the red square red",
                "[global_edit] make it noon", "make it night", "[compose] a red square"):
        with pytest.raises(ValueError):
            W.parse_prompt(bad) if not bad.startswith("[compose]") else W.task_of(bad)
    words = {w for s in specs for w in W.prompt_of(s).split()}
    assert words <= set(W.VOCAB)


def test_palette_is_separated() -> None:
    objects = list(W.COLORS.values())
    for band in (0, 1):
        group = objects + [c[band] for c in W.TIMES.values()]
        worst = min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(group, 2))
        assert worst >= 2 * R.RADIUS + 0.09, worst


def test_renderer_and_data_are_deterministic() -> None:
    for make in (lambda r: W.base_example(r), lambda r: W.clean_example("local_edit", r),
                 lambda r: W.clean_example("global_edit", r), lambda r: W.clean_example("t2i", r)):
        a = [make(np.random.default_rng(7)) for _ in range(3)]
        b = [make(np.random.default_rng(7)) for _ in range(3)]
        for x, y in zip(a, b):
            assert x.prompt == y.prompt and np.array_equal(x.target, y.target)
            assert (x.source is None) == (y.source is None)
            assert x.source is None or np.array_equal(x.source, y.source)
    assert W.eval_items() == W.eval_items()
    scene = W.place("dusk", ("red", "blue"), np.random.default_rng(1))
    img = W.render(scene)
    assert img.dtype == np.float32 and img.shape == (3, 16, 16) and img.min() >= -1 and img.max() <= 1
    assert np.array_equal(img, W.render(scene))
    assert W.object_mask(scene).sum() == 72 and W.object_mask(scene, "red").sum() == 36


def test_edits_change_only_what_they_say() -> None:
    rng = np.random.default_rng(3)
    for _ in range(N):
        scene = W.random_scene(rng)
        local = W.random_edit("local_edit", scene, rng)
        diff = (W.render(W.apply(local, scene)) != W.render(scene)).any(0)
        assert np.array_equal(diff, W.object_mask(scene, local.src))
        relit = W.apply(W.random_edit("global_edit", scene, rng), scene)
        same = (W.render(relit) == W.render(scene)).all(0)
        assert np.array_equal(same, W.object_mask(scene))
    with pytest.raises(ValueError):
        W.apply(W.GlobalEdit(scene.time), scene)


def test_base_mixture_is_imperfect() -> None:
    rng = np.random.default_rng(0)
    examples = [W.base_example(rng) for _ in range(300)]
    tasks = [ex.task for ex in examples]
    assert all(abs(tasks.count(t) / 300 - 1 / 3) < 0.08 for t in W.TASKS)
    scores = np.array([R.item_scores(ex.target, ex.prompt, ex.source)["score"] for ex in examples])
    assert 0.3 < (scores < 0.99).mean() < 0.7  # label noise 0.35 and degradation 0.3 of the targets


def _cases(task: str, rng: np.random.Generator) -> dict[str, float]:
    ex = W.clean_example(task, rng)
    noise = np.clip(rng.standard_normal(ex.target.shape), -1, 1)
    out = {"gt": R.item_scores(ex.target, ex.prompt, ex.source)["score"],
           "noise": R.item_scores(noise, ex.prompt, ex.source)["score"]}
    if ex.source is not None:
        out["copy"] = R.item_scores(ex.source, ex.prompt, ex.source)["score"]
    return out


@pytest.mark.parametrize("task", W.TASKS)
def test_rewards_one_on_ground_truth_zero_on_noise(task: str) -> None:
    rng = np.random.default_rng(11)
    cases = [_cases(task, rng) for _ in range(N)]
    assert min(c["gt"] for c in cases) == 1.0
    assert max(c["noise"] for c in cases) < 0.05
    if task != "t2i":  # the lazy edit (output = source) did nothing asked
        assert max(c["copy"] for c in cases) == 0.0


@pytest.mark.parametrize("task", W.EDIT_TASKS)
def test_rewards_near_zero_on_wrong_edits(task: str) -> None:
    rng = np.random.default_rng(12)
    scores = []
    for _ in range(N):
        scene = W.random_scene(rng)
        edit = W.random_edit(task, scene, rng)
        bad = W.corrupt_local(scene, edit, rng) if task == "local_edit" else W.corrupt_global(scene, edit, rng)
        scores.append(R.item_scores(W.render(bad), W.prompt_of(edit), W.render(scene))["score"])
    # mean over the corruption kinds; a re-laid-out relight that happens to overlap the old squares keeps some
    assert np.mean(scores) < 0.1 and np.median(scores) == 0.0


def test_preservation_and_correctness_terms() -> None:
    scene = W.place("day", ("red", "green"), np.random.default_rng(5))
    src = W.render(scene)
    local = W.LocalEdit("red", "blue")
    right = W.render(W.apply(local, scene))
    s = R.local_scores(src, right, local)
    assert (s["correct"], s["preserve"]) == (1.0, 1.0)
    wrong_object = W.render(W.apply(W.LocalEdit("green", "yellow"), scene))
    s = R.local_scores(src, wrong_object, local)
    assert s["correct"] == 0.0 and 0.7 < s["preserve"] < 0.9  # the other square changed: 36 of ~192 px
    relit_too = W.render(W.apply(W.GlobalEdit("night"), W.apply(local, scene)))
    s = R.local_scores(src, relit_too, local)
    assert s["correct"] == 1.0 and s["preserve"] < 0.25 and s["score"] < 0.25
    glob = W.GlobalEdit("night")
    moved = W.render(W.place("night", scene.colors, np.random.default_rng(99)))
    g = R.global_scores(src, moved, glob)
    assert g["preserve"] < 0.6 and R.global_scores(src, W.render(W.apply(glob, scene)), glob)["score"] == 1.0
    for kind in W.DEGRADATIONS:  # degraded targets lose reward; washed-out colours leave every palette ball
        assert R.local_scores(src, W.degrade(right, np.random.default_rng(0), kind=kind), local)["score"] < 0.8
    assert R.local_scores(src, W.degrade(right, np.random.default_rng(0), kind="wash"), local)["score"] == 0.0


def test_score_row_columns() -> None:
    rng = np.random.default_rng(2)
    exs = [W.clean_example(t, rng) for t in W.TASKS for _ in range(2)]
    row = R.score_row(np.stack([e.target for e in exs]), [e.prompt for e in exs], [e.source for e in exs])
    assert set(R.COLUMNS) <= set(row) and all(row[c] == 1.0 for c in R.COLUMNS)
    partial = R.score_row(np.stack([exs[0].target]), [exs[0].prompt], [None])
    assert np.isnan(partial["local_edit"]) and partial["average"] == 1.0
    with pytest.raises(ValueError, match="without a source"):
        R.score_row(np.stack([exs[2].target]), [exs[2].prompt], [None])


def test_conditioning_of_examples_keeps_the_source() -> None:
    rng = np.random.default_rng(4)
    enc = new_encoder()
    exs = [W.clean_example("local_edit", rng), W.clean_example("t2i", rng), W.clean_example("global_edit", rng)]
    x0, cond = example_batch(enc, exs, [False, False, True])
    assert cond.n_source.tolist() == [1, 0, 1]
    assert torch.equal(cond.source[0], torch.from_numpy(exs[0].source)) and not cond.source[1].any()
    assert torch.equal(cond.source[2], torch.from_numpy(exs[2].source))  # the dropped prompt keeps the image
    twin = cond[2:].uncond_twin(enc.encode([""]))
    assert all(torch.equal(a, b) for a, b in zip(twin.segments(0), cond.segments(2)))
    ref = conditioning(enc, [exs[0].prompt], [exs[0].source])
    assert torch.equal(ref.cap, cond.cap[:1])
    loss = flow_matching_loss(new_transformer(0), x0, cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad


def test_ode_rollout_keeps_the_source_bit_identical() -> None:
    from engine.worlds.toy_edit.eval import EvalSettings, ode_sample

    rng = np.random.default_rng(8)
    exs = [W.clean_example("local_edit", rng), W.clean_example("t2i", rng)]
    enc = new_encoder()
    _, cond = example_batch(enc, exs)
    before = cond.source.clone()
    x = ode_sample(new_transformer(0), torch.randn(2, 3, 16, 16), cond, EvalSettings(steps=3, cfg=2.0),
                   cond.uncond_twin(enc.encode([""])))
    assert torch.equal(cond.source, before) and x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
