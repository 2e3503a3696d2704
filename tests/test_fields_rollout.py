"""Field evaluation (reference path) and rollouts."""

from __future__ import annotations

import pytest
import torch

from engine.adapters.lora import STUDENT, AdapterSwitch
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.fields import Field, PeftFieldEvaluator, student_field
from engine.ops import sde_step_ref
from engine.sampling.rollout import SampleNoise, rollout
from engine.sampling.schedule import flow_match_sigmas
from tests.helpers import TINY, randomize_student, tiny_inputs, tiny_model

FIELDS = [Field("e0", "t0", 3.0), Field("e1", "t1", 1.0), Field("anchor", None, 1.0), Field("cfg", None, 4.5)]


def _uncond() -> SD3Cond:
    return SD3Cond(torch.zeros(1, TINY.text_seq_len, TINY.joint_attention_dim),
                   torch.zeros(1, TINY.pooled_projection_dim))


def manual(model, adapter, scale, x, sigma, cond, uncond):
    switch = AdapterSwitch(model)
    switch.activate(adapter)
    with torch.no_grad():
        vc = predict_velocity(model, x, sigma, cond)
        if scale == 1.0:
            return vc
        vu = predict_velocity(model, x, sigma, uncond.expand(x.shape[0]))
    return vu + scale * (vc - vu)


def test_velocities_route_each_row_to_its_field() -> None:
    model = tiny_model()
    uncond = _uncond()
    ev = PeftFieldEvaluator(model, predict_velocity, FIELDS, uncond)
    x, sigma, cond = tiny_inputs(b=7)
    rows = ["e1", "anchor", "e0", "cfg", "e1", "e0", "anchor"]
    with torch.no_grad():
        out = ev.velocities(x, sigma, cond, rows)
    for i, name in enumerate(rows):
        f = ev.field(name)
        want = manual(model, f.adapter, f.cfg_scale, x[i : i + 1], sigma[i : i + 1], cond[[i]], uncond)
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-5, atol=1e-5)
    assert ev.switch.current == STUDENT  # restored after use
    with pytest.raises(KeyError, match="unknown field 'nope'"):
        ev.velocities(x[:1], sigma[:1], cond[[0]], ["nope"])


def test_student_field_gradients_reach_only_student() -> None:
    model = tiny_model()
    randomize_student(model)
    ev = PeftFieldEvaluator(model, predict_velocity, FIELDS + [student_field(2.0)], _uncond())
    x, sigma, cond = tiny_inputs(b=2)
    v = ev.field_velocity(student_field(2.0), x, sigma, cond)
    v.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(f".{STUDENT}." in n for n in grads)


def _rollout(model, ids, sampler="sde", steps=5):
    ev = PeftFieldEvaluator(model, predict_velocity, [student_field(1.0)], _uncond())
    gen = torch.Generator().manual_seed(1)
    cond = SD3Cond(torch.randn(len(ids), TINY.text_seq_len, TINY.joint_attention_dim, generator=gen),
                torch.randn(len(ids), TINY.pooled_projection_dim, generator=gen))
    noise = SampleNoise(3, ids, (TINY.latent_channels, TINY.latent_size, TINY.latent_size), torch.device("cpu"))
    sig = flow_match_sigmas(steps, 3.0)
    traj = rollout(lambda x, s: ev.field_velocity(student_field(1.0), x, s, cond), noise, sig, sampler, 0.7)
    return traj, ev, cond


def test_rollout_shapes_logprobs_and_determinism() -> None:
    model = tiny_model()
    traj, ev, cond = _rollout(model, [4, 9])
    assert traj.states.shape == (6, 2, 4, 8, 8) and traj.log_probs.shape == (5, 2)
    again, _, _ = _rollout(model, [4, 9])
    assert torch.equal(traj.states, again.states)
    # the stored log-prob equals re-scoring the stored transition
    t = 2
    sig = traj.sigmas
    with torch.no_grad():
        v = ev.field_velocity(student_field(1.0), traj.states[t], sig[t].expand(2), cond)
    re = sde_step_ref(traj.states[t], v, sig[t].expand(2), sig[t + 1].expand(2), sig[1], 0.7,
                      prev_sample=traj.states[t + 1])
    torch.testing.assert_close(re.log_prob, traj.log_probs[t], rtol=1e-5, atol=1e-5)


def test_sample_noise_is_keyed_by_sample_id_not_batch() -> None:
    shape = (4, 8, 8)
    a = SampleNoise(0, [3, 5], shape, torch.device("cpu"))
    b = SampleNoise(0, [5], shape, torch.device("cpu"))
    assert torch.equal(a.initial()[1], b.initial()[0]) and torch.equal(a.step(2)[1], b.step(2)[0])
    assert not torch.equal(a.step(1)[1], a.step(2)[1])


def test_ode_rollout_is_deterministic_euler() -> None:
    model = tiny_model()
    traj, ev, cond = _rollout(model, [1], sampler="ode", steps=3)
    assert torch.count_nonzero(traj.log_probs) == 0
    sig = traj.sigmas
    with torch.no_grad():
        v = ev.field_velocity(student_field(1.0), traj.states[0], sig[0].expand(1), cond)
    torch.testing.assert_close(traj.states[1], traj.states[0] + (sig[1] - sig[0]) * v)
