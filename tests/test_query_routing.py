from __future__ import annotations

import collections

import pytest
import torch

from engine.config import OPDConfig
from engine.data.prompts import Prompt, parse_tagged
from engine.data.sampler import PromptSampler, weighted_pool
from engine.opd.query import bin_probabilities, select_queries
from engine.opd.routing import Router, RoutingError


def test_dense_queries_are_every_state_but_last() -> None:
    q = select_queries(10, [0, 1, 2], 0, "uniform", seed=0)
    assert q.tolist() == [list(range(9))] * 3


@pytest.mark.parametrize("bias", ["uniform", "low", "mid", "high"])
def test_bin_probabilities_match_int_u_n(bias: str) -> None:
    # DanceOPD's biases (danceopd/core/timestep.py:49-54): high_t Beta(2,5), mid_t Beta(5,5), low_t Beta(5,2)
    a, b = {"uniform": (1, 1), "low": (5, 2), "mid": (5, 5), "high": (2, 5)}[bias]
    n = 9
    probs = bin_probabilities(n, bias)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    u = torch.distributions.Beta(float(a), float(b)).sample((200_000,))
    empirical = torch.bincount((u * n).long().clamp(max=n - 1), minlength=n).double() / u.numel()
    torch.testing.assert_close(empirical, probs, atol=4e-3, rtol=0)


def test_low_bias_prefers_low_noise_states() -> None:
    q = select_queries(16, list(range(400)), 1, "low", seed=3).flatten()
    assert q.float().mean() > 0.6 * 14  # Beta(5,2) has mean 5/7 of the way to low noise
    assert q.min() >= 0 and q.max() <= 14


def test_k_queries_distinct_sorted_deterministic() -> None:
    a = select_queries(10, [5, 6, 7], 4, "mid", seed=1)
    b = select_queries(10, [5, 6, 7], 4, "mid", seed=1)
    assert torch.equal(a, b)
    for row in a:
        assert row.unique().numel() == 4 and torch.equal(row, row.sort().values)
    # a sample's draw does not depend on its batch mates
    assert torch.equal(select_queries(10, [6], 4, "mid", seed=1)[0], a[1])


def test_query_errors() -> None:
    with pytest.raises(ValueError):
        select_queries(1, [0], 0, "low", 0)
    with pytest.raises(ValueError):
        select_queries(5, [0], 5, "low", 0)


PROMPTS = [parse_tagged(t) for t in ["[a] x1", "[a] x2", "[b] y1", "[b] y2", "[b] y3", "[c] z"]]


def test_task_routing_is_hard_per_sample() -> None:
    r = Router(OPDConfig(routing="task", routes={"a": "fa", "b": "fb", "c": "fc"}), PROMPTS, seed=0)
    assert r.route(0, ["a", "b", "c", "b"]) == ["fa", "fb", "fc", "fb"]
    assert r.draw(3).pool is None and r.draw(3).pool_step == 3


def test_task_routing_refuses_unrouted_tasks() -> None:
    with pytest.raises(RoutingError, match=r"without a route: \['c'\]"):
        Router(OPDConfig(routing="task", routes={"a": "fa", "b": "fb"}), PROMPTS, seed=0)


def test_field_step_routing_draws_one_field_per_step_by_weight() -> None:
    r = Router(OPDConfig(routing="field_step", weights={"f1": 3.0, "f2": 1.0, "f0": 0.0}), PROMPTS, seed=0)
    picks = []
    for step in range(2000):
        fields = r.route(step, ["a", "b", "c"])
        assert len(set(fields)) == 1
        picks.append(fields[0])
    counts = collections.Counter(picks)
    assert counts["f0"] == 0
    assert 0.70 < counts["f1"] / 2000 < 0.80
    assert r.route(17, ["a"]) == r.route(17, ["b"])  # a pure function of the step


def test_epoch_routing_alternates_datasets() -> None:
    r = Router(OPDConfig(routing="epoch", routes={"a": "fa", "b": "fb"}, epoch_steps=2), PROMPTS, seed=0)
    assert [r.epoch_task(s) for s in range(6)] == ["a", "a", "b", "b", "a", "a"]
    d = r.draw(2)
    assert [PROMPTS[i].task for i in d.pool] == ["b", "b", "b"] and d.key == 2 and d.pool_step == 0
    assert r.draw(5).pool_step == 3  # steps 0, 1, 4 drew bucket a before step 5
    s = PromptSampler(PROMPTS, seed=0, per_rank=4)
    batch = s.batch(2, 0, d.pool, d.key, d.pool_step)
    assert set(batch.tasks) == {"b"} and r.route(2, batch.tasks) == ["fb"] * 4


def test_sampler_rank_split_equals_single_rank() -> None:
    prompts = [Prompt(f"p{i}", "t") for i in range(7)]
    single = PromptSampler(prompts, seed=5, per_rank=4, group_size=2)
    ranks = [PromptSampler(prompts, seed=5, per_rank=2, group_size=2, world=2, rank=k) for k in range(2)]
    for step in range(5):
        one = single.batch(step)
        two = [rk.batch(step) for rk in ranks]
        assert one.sample_ids == two[0].sample_ids + two[1].sample_ids
        assert one.prompt_ids == two[0].prompt_ids + two[1].prompt_ids


def test_sampler_epochs_are_permutations() -> None:
    prompts = [Prompt(f"p{i}", "t") for i in range(6)]
    s = PromptSampler(prompts, seed=1, per_rank=3)
    first_epoch = s.batch(0).prompt_ids + s.batch(1).prompt_ids
    assert sorted(first_epoch) == list(range(6))
    assert s.batch(0).sample_ids == [0, 1, 2] and PromptSampler(prompts, 1, 3, group_size=2).batch(1).sample_ids == [
        6, 7, 8, 9, 10, 11]


def test_task_weights_reshape_the_epoch() -> None:
    prompts = [Prompt(f"a{i}", "a") for i in range(6)] + [Prompt(f"b{i}", "b") for i in range(2)] + [
        Prompt("c0", "c")]
    pool = weighted_pool(prompts, {"a": 1.0, "b": 1.0, "c": 0.5})
    tasks = collections.Counter(prompts[i].task for i in pool)
    assert tasks == {"a": 6, "b": 6, "c": 3}  # b's 2 prompts cycled to 6 slots, c gets half
    assert collections.Counter(pool)[6] == 3 and collections.Counter(pool)[7] == 3
    assert "a" not in {prompts[i].task for i in weighted_pool(prompts, {"a": 0.0, "b": 1.0, "c": 1.0})}
    with pytest.raises(ValueError, match=r"no weight for task\(s\) \['c'\]"):
        weighted_pool(prompts, {"a": 1.0, "b": 1.0})

    # one epoch of the weighted sampler is a permutation of the pool; ranks still split one rank's draw exactly
    single = PromptSampler(prompts, seed=3, per_rank=5, task_weights={"a": 1, "b": 1, "c": 0.5})
    epoch = sum((single.batch(s).prompt_ids for s in range(3)), [])
    assert sorted(epoch) == sorted(pool)
    ranks = [PromptSampler(prompts, seed=3, per_rank=1, world=5, rank=k, task_weights={"a": 1, "b": 1, "c": 0.5})
             for k in range(5)]
    for step in range(4):
        assert single.batch(step).prompt_ids == sum((r.batch(step).prompt_ids for r in ranks), [])


def test_task_weights_config_errors_name_the_task() -> None:
    from engine.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.task_weights={compose=1.0, text=-1.0}"])
    assert "data.task_weights.text = -1.0; must be >= 0" in str(err.value)
    with pytest.raises(ConfigError, match=r"no weight for task\(s\) \['aesthetic'\]"):
        load_config(None, ["data.task_weights={compose=1.0, text=1.0}"], paths=True)
    with pytest.raises(ConfigError, match=r"task\(s\) \['ocr'\] have no prompts"):
        load_config(None, ["data.task_weights={compose=1.0, text=1.0, aesthetic=1.0, ocr=2.0}"], paths=True)
