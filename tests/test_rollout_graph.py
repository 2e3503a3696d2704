"""RolloutRunner (engine/sampling/rollout_graph.py): eager fallback vs the reference rollout, noise keying, capture
fallback; CUDA graph replay vs eager, zero host syncs, in-place weight updates (CUDA tests skip without a GPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.adapters.lora import STUDENT
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.fields import PeftFieldEvaluator, student_field
from engine.sampling.rollout import PhiloxNoise, SampleNoise, rollout
from engine.sampling.rollout_graph import RolloutRunner
from engine.sampling.schedule import flow_match_sigmas
from tests.helpers import TINY, randomize_student, tiny_model

LATENT = (TINY.latent_channels, TINY.latent_size, TINY.latent_size)


def _uncond(device: torch.device | str = "cpu") -> SD3Cond:
    gen = torch.Generator().manual_seed(5)  # not zeros: the unconditional rows must matter
    return SD3Cond(torch.randn(1, TINY.text_seq_len, TINY.joint_attention_dim, generator=gen),
                torch.randn(1, TINY.pooled_projection_dim, generator=gen)).to(device)


def _cond(b: int, seed: int = 1, device: torch.device | str = "cpu") -> SD3Cond:
    gen = torch.Generator().manual_seed(seed)
    return SD3Cond(torch.randn(b, TINY.text_seq_len, TINY.joint_attention_dim, generator=gen),
                torch.randn(b, TINY.pooled_projection_dim, generator=gen)).to(device)


def _reference(model, cfg: float, cond: SD3Cond, noise: SampleNoise, sigmas: torch.Tensor, sampler: str):
    """The trainer's eager path: PeftFieldEvaluator velocity + the unfused step chain."""
    ev = PeftFieldEvaluator(model, predict_velocity, [student_field(cfg)], _uncond(noise.device))
    return rollout(lambda x, s: ev.field_velocity(student_field(cfg), x, s, cond), noise, sigmas, sampler, 0.7)


def _runner(model, cfg: float, sampler: str, graphs: bool = True, device: str = "cpu") -> RolloutRunner:
    return RolloutRunner(model, student_field(cfg), _uncond(device), velocity=predict_velocity, sampler=sampler,
                         noise_level=0.7, graphs=graphs)


@pytest.mark.parametrize("sampler,cfg", [("sde", 3.0), ("sde", 1.0), ("ode", 2.5)])
def test_fallback_matches_reference_rollout(sampler: str, cfg: float, caplog) -> None:
    model = tiny_model()
    randomize_student(model)
    ids = [4, 9, 11]
    noise = PhiloxNoise(3, ids, LATENT, torch.device("cpu"))
    sigmas, cond = flow_match_sigmas(5, 3.0), _cond(3)
    want = _reference(model, cfg, cond, noise, sigmas, sampler)
    runner = _runner(model, cfg, sampler)
    with caplog.at_level(logging.WARNING, logger="flowopd"):
        got = runner.rollout(cond, noise, sigmas)
        again = runner.rollout(cond, noise, sigmas)
    assert runner.last_mode == "eager" and len(runner.entries) == 1
    torch.testing.assert_close(got.states, want.states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.states, again.states) and torch.equal(got.sigmas, want.sigmas)
    assert torch.equal(got.states[0], SampleNoise(3, ids, LATENT, torch.device("cpu")).initial())
    assert len(caplog.records) == 1 and "eagerly" in caplog.records[0].message  # one line, not one per rollout
    if sampler == "sde":
        assert torch.all(got.log_probs != 0)
    else:
        assert torch.count_nonzero(got.log_probs) == 0


def test_fallback_with_the_triton_step_kernel(monkeypatch) -> None:
    """The fused kernel that a CUDA graph replays, run by Triton's CPU interpreter: in-kernel Philox noise and
    fused CFG agree with the reference rollout fed the same stream."""
    monkeypatch.setenv("FLOWOPD_BACKEND_SDE_STEP_INDEXED", "triton")
    model = tiny_model()
    randomize_student(model)
    noise = PhiloxNoise(7, [2, 30], LATENT, torch.device("cpu"))
    sigmas, cond = flow_match_sigmas(3, 3.0), _cond(2, seed=3)
    want = _reference(model, 4.5, cond, noise, sigmas, "sde")
    got = _runner(model, 4.5, "sde").rollout(cond, noise, sigmas)
    # float32 Box-Muller in the kernel vs float64 in the reference stream: ~1e-6 relative
    torch.testing.assert_close(got.states, want.states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)


def test_philox_noise_is_keyed_by_sample_id_and_step() -> None:
    cpu = torch.device("cpu")
    pair, alone = PhiloxNoise(0, [3, 5], LATENT, cpu), PhiloxNoise(0, [5], LATENT, cpu)
    assert torch.equal(pair.step(2)[1], alone.step(2)[0])  # batch position / batch size 1 do not matter
    assert torch.equal(pair.initial(), SampleNoise(0, [3, 5], LATENT, cpu).initial())
    assert not torch.equal(pair.step(1)[1], pair.step(2)[1])
    assert not torch.equal(pair.step(1)[1], PhiloxNoise(1, [5], LATENT, cpu).step(1)[0])
    z = PhiloxNoise(0, list(range(64)), LATENT, cpu).step(0)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # 16384 draws: 4 sigma = 0.03


def test_trajectory_rows_do_not_depend_on_the_batch() -> None:
    model = tiny_model()
    randomize_student(model)
    sigmas, cond = flow_match_sigmas(4, 3.0), _cond(2)
    runner = _runner(model, 2.0, "sde")
    both = runner.rollout(cond, PhiloxNoise(1, [6, 8], LATENT, torch.device("cpu")), sigmas)
    one = runner.rollout(cond[[1]], PhiloxNoise(1, [8], LATENT, torch.device("cpu")), sigmas)
    assert len(runner.entries) == 2  # B = 2 and B = 1 are different graphs
    torch.testing.assert_close(both.states[:, 1], one.states[:, 0], rtol=1e-5, atol=1e-5)


def test_capture_failure_falls_back_once(monkeypatch, caplog) -> None:
    model = tiny_model()
    runner = _runner(model, 2.0, "sde")
    calls = []

    def broken(key, entry):
        calls.append(key)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(RolloutRunner, "_can_capture", staticmethod(lambda key: True))
    monkeypatch.setattr(runner, "_record", broken)
    noise, sigmas, cond = PhiloxNoise(0, [1, 2], LATENT, torch.device("cpu")), flow_match_sigmas(3, 3.0), _cond(2)
    with caplog.at_level(logging.WARNING, logger="flowopd"):
        first = runner.rollout(cond, noise, sigmas)
        second = runner.rollout(cond, noise, sigmas)
    assert len(calls) == 1 and runner.last_mode == "eager"  # no retry for a key that failed
    assert len(caplog.records) == 1 and "capturing the rollout step failed" in caplog.records[0].message
    assert torch.equal(first.states, second.states)
    assert runner.switch.current == STUDENT


def test_runner_rejects_generator_noise() -> None:
    runner = _runner(tiny_model(), 1.0, "sde")
    with pytest.raises(TypeError, match="PhiloxNoise"):
        runner.rollout(_cond(1), SampleNoise(0, [0], LATENT, torch.device("cpu")), flow_match_sigmas(2, 3.0))


# --------------------------------------------------------------------------------------------- CUDA


def _cuda_model(dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_model()
    randomize_student(model)
    return model.to("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler,cfg", [("sde", 4.5), ("sde", 1.0), ("ode", 4.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_equals_eager_on_cuda(sampler: str, cfg: float, dtype: torch.dtype) -> None:
    model = _cuda_model(dtype)
    dev = torch.device("cuda")
    sigmas = flow_match_sigmas(10, 3.0).to(dev)
    graph, eager = _runner(model, cfg, sampler, True, "cuda"), _runner(model, cfg, sampler, False, "cuda")
    for batch, ids in enumerate(([1, 2, 3, 4], [7, 8, 9, 10])):  # two batches of one shape: one graph, replayed
        noise, cond = PhiloxNoise(11, ids, LATENT, dev), _cond(4, seed=batch, device="cuda")
        g, e = graph.rollout(cond, noise, sigmas), eager.rollout(cond, noise, sigmas)
        assert graph.last_mode == "graph" and eager.last_mode == "eager"
        # same kernels on the same buffers (normally bit-equal); a GEMM algorithm picked differently under capture
        # is the only allowed difference: bf16 rounding (eps 7.8e-3), where wrong noise or weights differ by O(1)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.states, e.states, rtol=tol, atol=tol)
        torch.testing.assert_close(g.log_probs, e.log_probs, rtol=tol, atol=tol)
    assert len(graph.entries) == 1
    if dtype == torch.float32:  # and the fused graph path equals the unfused reference rollout (float32 vs float64
        # Box-Muller noise, fused vs unfused CFG: ~1e-6 per step, amplified over 10 steps)
        ref = _reference(model, cfg, cond, noise, sigmas, sampler)
        torch.testing.assert_close(g.states, ref.states, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g.log_probs, ref.log_probs, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_graph_rollout_has_no_host_sync_and_sees_weight_updates() -> None:
    model = _cuda_model(torch.bfloat16)
    dev = torch.device("cuda")
    sigmas = flow_match_sigmas(10, 3.0).to(dev)
    runner = _runner(model, 4.5, "sde", True, "cuda")
    noise, cond = PhiloxNoise(2, [0, 1], LATENT, dev), _cond(2, device="cuda")
    runner.rollout(cond, noise, sigmas)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        before = runner.rollout(cond, noise, sigmas)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():  # an optimizer step: in place, same storage
        for name, p in model.named_parameters():
            if f"lora_B.{STUDENT}" in name:
                p.mul_(-2.0)
    after = runner.rollout(cond, noise, sigmas)
    assert runner.last_mode == "graph" and len(runner.entries) == 1
    want = _runner(model, 4.5, "sde", False, "cuda").rollout(cond, noise, sigmas)
    torch.testing.assert_close(after.states, want.states, rtol=1e-2, atol=1e-2)  # bf16, as above
    assert not torch.allclose(after.states[-1], before.states[-1])


@pytest.mark.slow
def test_trainer_ode_step_is_the_same_with_and_without_the_runner(tmp_path) -> None:
    """kernels.cuda_graphs only changes the SDE step noise: an ODE rollout (the initial latent is the reference
    stream's) gives the trainer the same states, hence the same loss, as the reference rollout."""
    from engine.config import load_config
    from engine.sampling.rollout_graph import GraphRollout
    from engine.trainer import Trainer
    from tests.test_train import REPO

    losses = []
    for graphs in ("false", "true"):
        cfg = load_config(REPO / "configs" / "tiny.toml", [
            "rollout.sampler=ode", "rollout.steps=3", "rollout.group_size=1", "train.steps=1", "train.save_every=0",
            f"kernels.cuda_graphs={graphs}", f'output_dir="{tmp_path / graphs}"'])
        trainer = Trainer(cfg)
        try:
            assert isinstance(trainer.rollout, GraphRollout) == (graphs == "true")
            losses.append(trainer.train_step(0)["loss"])
        finally:
            trainer.close()
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
