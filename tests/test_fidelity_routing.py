"""Routing, query candidates and off-policy states as the papers' code defines them (issue 14).

- DanceOPD G=1 (danceopd/core/engine.py:124-146): one route per optimizer step, every micro-batch from its
  bucket, the draw a pure function of (seed, step) (so resume and world-size changes are exact), frequencies
  following the route weights; each bucket is swept as a permutation on its own counter.
- Flow-OPD's alternation with per-task epoch counts (scripts/train_sd3_opd_mix.py:872-882).
- query candidates: DanceOPD's all-T states vs Flow-OPD's T-1, stratified draws, DiffusionOPD's weighting.
- off-policy states: the forward-noised endpoint with fresh noise per state.
"""

from __future__ import annotations

import collections

import pytest
import torch

from engine.config import OPDConfig
from engine.data.prompts import Prompt
from engine.data.sampler import PromptSampler
from engine.opd.query import bin_probabilities, num_candidates, select_queries, state_weight
from engine.opd.routing import SOFT, Router
from engine.opd.states import forward_noised, random_endpoints
from engine.sampling.schedule import flow_match_sigmas

PROMPTS = ([Prompt(f"a{i}", "a") for i in range(5)] + [Prompt(f"b{i}", "b") for i in range(3)]
           + [Prompt(f"c{i}", "c") for i in range(7)])
ROUTES = {"a": "fa", "b": "fb", "c": "fc"}


def step_router(seed: int = 0, **kw) -> Router:
    return Router(OPDConfig(routing="step", routes=ROUTES, **kw), PROMPTS, seed=seed)


def test_g1_routing_binds_every_micro_batch_of_a_step_to_one_route() -> None:
    r = step_router(route_weights={"a": 1.0, "b": 1.0, "c": 2.0})
    s = PromptSampler(PROMPTS, seed=0, per_rank=3, group_size=2, accum=4)
    for step in range(30):
        d = r.draw(step)
        tasks = set()
        for micro in range(4):
            batch = s.batch(step, micro, d.pool, d.key, d.pool_step)
            tasks |= set(batch.tasks)
            assert r.route(step, batch.tasks) == [ROUTES[batch.tasks[0]]] * len(batch)
        assert tasks == {r.bucket(step)}


def test_g1_draw_is_a_pure_function_of_seed_and_step_with_the_route_weights() -> None:
    r = step_router(seed=3, route_weights={"a": 1.0, "b": 0.0, "c": 3.0})
    picks = [r.bucket(step) for step in range(4000)]
    counts = collections.Counter(picks)
    assert counts["b"] == 0 and 0.72 < counts["c"] / 4000 < 0.78
    fresh = step_router(seed=3, route_weights={"a": 1.0, "b": 0.0, "c": 3.0})  # a resumed run: no history
    assert [fresh.draw(s) for s in (3999, 17, 2500)] == [r.draw(s) for s in (3999, 17, 2500)]
    assert step_router(seed=4).bucket(0) is not None
    assert [step_router(seed=4).bucket(s) for s in range(50)] != picks[:50]  # the seed matters


def test_g1_buckets_are_swept_as_permutations_and_sample_ids_stay_unique() -> None:
    r = step_router()
    s = PromptSampler(PROMPTS, seed=1, per_rank=1)
    seen: dict[str, list[int]] = collections.defaultdict(list)
    ids: list[int] = []
    for step in range(60):
        d = r.draw(step)
        batch = s.batch(step, 0, d.pool, d.key, d.pool_step)
        seen[r.bucket(step)] += batch.prompt_ids
        ids += batch.sample_ids
    for task, pids in seen.items():
        n = len(r.pools[task])
        for e in range(len(pids) // n):  # every full epoch of a bucket covers it exactly once
            assert sorted(pids[e * n:(e + 1) * n]) == r.pools[task]
    assert len(ids) == len(set(ids))


def test_g1_two_ranks_draw_what_one_rank_draws() -> None:
    r = step_router(route_weights={"a": 2.0, "b": 1.0, "c": 1.0})
    one = PromptSampler(PROMPTS, seed=5, per_rank=4, group_size=2, accum=2)
    two = [PromptSampler(PROMPTS, seed=5, per_rank=2, group_size=2, accum=2, world=2, rank=k) for k in range(2)]
    for step in range(20):
        d = r.draw(step)  # every rank computes the same route itself: no broadcast needed
        for micro in range(2):
            a = one.batch(step, micro, d.pool, d.key, d.pool_step)
            b = [t.batch(step, micro, d.pool, d.key, d.pool_step) for t in two]
            assert a.prompt_ids == b[0].prompt_ids + b[1].prompt_ids
            assert a.sample_ids == b[0].sample_ids + b[1].sample_ids


def test_epoch_routing_with_flow_opds_per_task_epoch_counts() -> None:
    r = Router(OPDConfig(routing="epoch", routes=ROUTES, epoch_steps=2, epoch_counts={"b": 1, "a": 3}), PROMPTS, 0)
    # Flow-OPD's cycle ocr 1 : geneval 3, in the given order (get_current_dataset_idx)
    assert [r.epoch_task(s) for s in range(18)] == (["b"] * 2 + ["a"] * 6) * 2 + ["b"] * 2
    assert r.draw(9).pool_step == 3 and r.draw(17).pool_step == 5  # b's steps 0, 1, 8, 9, 16, 17
    assert "c" not in {r.epoch_task(s) for s in range(100)}


def test_soft_routing_mixes_normalised_weights() -> None:
    r = Router(OPDConfig(routing="soft", routes=ROUTES, weights={"fa": 1.0, "fb": 3.0, "fc": 0.0}), PROMPTS, 0)
    assert r.mix == {"fa": 0.25, "fb": 0.75} and r.route(5, ["a", "c"]) == [SOFT, SOFT]
    assert r.draw(5).pool is None


def test_candidates_all_include_the_last_step_input() -> None:
    assert num_candidates(10, "train") == 9 and num_candidates(10, "all") == 10
    assert select_queries(10, [0, 1], 0, "low", 0, "all").tolist() == [list(range(10))] * 2
    assert select_queries(10, list(range(300)), 1, "low", 0, "all").max() == 9
    assert select_queries(10, list(range(300)), 1, "low", 0, "train").max() == 8


def test_all_t_candidates_give_danceopds_low_noise_mass() -> None:
    """The issue's numbers: P(sigma < 0.3) of one Beta(5,2) state at T = 16 is 16.7% over all T states (DanceOPD's
    int(u n), n = len(trajectory)) and 5.6% over the T-1 training states."""
    sig = flow_match_sigmas(16, 3.0)
    for candidates, expected in (("all", 0.167), ("train", 0.056)):
        n = num_candidates(16, candidates)
        p = bin_probabilities(n, "low")
        assert float(p[sig[:n] < 0.3].sum()) == pytest.approx(expected, abs=5e-4)


def test_stratified_draws_one_state_per_stratum() -> None:
    q = select_queries(10, list(range(2000)), 3, "stratified", seed=2, candidates="all")
    width = 10 / 3
    for i in range(3):
        col = q[:, i]
        assert (col >= int(i * width)).all() and (col <= min(int((i + 1) * width), 9)).all()
    one = select_queries(10, list(range(20000)), 1, "stratified", seed=2, candidates="all").flatten()
    freq = torch.bincount(one, minlength=10).double() / one.numel()
    torch.testing.assert_close(freq, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01, rtol=0)


def test_diffusionopd_weighting_is_the_weighted_sum_over_states() -> None:
    losses = torch.rand(10, dtype=torch.float64)  # one per query chunk, T = 10 states
    w = state_weight(10, 10, "diffusionopd")
    assert float(w * losses.mean()) == pytest.approx(float((0.5 / 10**2 * losses).sum()), rel=1e-12)
    assert state_weight(2, 10, "mean") == 1.0


def test_off_policy_states_are_the_forward_noised_endpoint() -> None:
    sig = flow_match_sigmas(6, 3.0)
    end = random_endpoints([4, 9], (3, 2, 2), seed=1, device=torch.device("cpu"))
    traj = forward_noised(end, [4, 9], sig, seed=1)
    assert traj.states.shape == (7, 2, 3, 2, 2) and torch.equal(traj.samples, end)
    assert traj.log_probs.abs().max() == 0
    noise = (traj.states[2] - (1 - sig[2]) * end) / sig[2]
    noise3 = (traj.states[3] - (1 - sig[3]) * end) / sig[3]
    assert abs(float(noise.std()) - 1) < 0.5 and not torch.allclose(noise, noise3)  # fresh noise per state
    again = forward_noised(random_endpoints([9], (3, 2, 2), 1, torch.device("cpu")), [9], sig, seed=1)
    torch.testing.assert_close(again.states[:, 0], traj.states[:, 1], rtol=0, atol=0)  # keyed by sample id


# ------------------------------------------------------------------------------------ through the trainer

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
G1 = ["opd.routing='step'", "opd.route_weights={compose=1.0, text=2.0}", "opd.query_candidates='all'",
      "opd.query_states=2", "opd.query_bias='stratified'", "rollout.steps=4", "rollout.group_size=2",
      "train.save_every=2"]


def _train(out, overrides):
    from engine.config import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(REPO / "configs" / "tiny.toml", [*G1, *overrides, f'output_dir="{out}"']))
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.mark.parametrize("extra", [[], ["opd.states='off_policy'", "opd.offpolicy_endpoint='field'",
                                        "opd.loss='mse'", "rollout.sampler='ode'"]], ids=["on_policy", "off_policy"])
def test_g1_routing_resumes_bit_exactly(tmp_path, extra) -> None:
    full = _train(tmp_path / "full", [*extra, "train.steps=4"])
    part = _train(tmp_path / "split", [*extra, "train.steps=2"])
    rest = _train(tmp_path / "split", [*extra, "train.steps=4"])
    assert [r["step"] for r in rest] == [2, 3]
    for a, b in zip(full, part + rest):
        assert (a["loss"], a["grad_norm"], a["data_crc"]) == (b["loss"], b["grad_norm"], b["data_crc"])
        assert len({k for k in a if k.startswith("field/")}) == 1  # one route per step
    a = (tmp_path / "full" / "export" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "split" / "export" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.distributed
def test_g1_routing_two_ranks_match_one_rank(tmp_path) -> None:
    """Two gloo ranks with 1 prompt each (started as torchrun does) == one process with 2 prompts, G=1 routing."""
    import os
    import socket
    import subprocess
    import sys

    from engine.metrics import read_metrics

    sets = sum((["--set", s] for s in [*G1, "train.steps=3"]), [])
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "tiny.toml"), *sets]
    base = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([*cmd, "--set", "train.prompts_per_step=1", "--output-dir", str(tmp_path / "two")],
                              env={**base, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    one = subprocess.run([*cmd, "--set", "train.prompts_per_step=2", "--output-dir", str(tmp_path / "one")],
                         env={k: v for k, v in base.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:]
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert {k for k in a if k.startswith("field/")} == {k for k in b if k.startswith("field/")}
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-9)
