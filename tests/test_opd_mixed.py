"""Flow-OPD's `mixed` OPD mode (opd.loss = "mixed"): kl_only's clipped ratio with the task advantage of the final
image added to A. Against Flow-OPD's code transcribed in float64 (scripts/train_sd3.py:1122-1170), against kl_only
when the task advantage is 0, the config checks, and a short run of the trainer with the toy world's rewards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, OPDConfig, load_config
from engine.opd.losses import opd_loss
from tests.test_fidelity_losses import SIG, flow_grpo_step, states, transition


def flow_opd_mixed(v_s, v_t, v_a, x, x_next, idx, logp_old, task_adv, beta, clip_range=1e-4, adv_clip_max=5.0,
                   kl_scale=-1.0):
    """train_sd3.py:1122-1170 (task advantage clamped, + kl_scale * step-wise kl_reward [B, 1], clamped) and
    :1186-1200 (ratio, clipped loss, the reference kl)."""
    log_prob, prev_sample_mean, std_dev_t = flow_grpo_step(v_s, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    _, prev_sample_mean_ref_lora, _ = flow_grpo_step(v_t, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    _, prev_sample_mean_ref_base, _ = flow_grpo_step(v_a, x, SIG[idx], SIG[idx + 1], SIG[1], x_next)
    task_advantage = torch.clamp(task_adv, -adv_clip_max, adv_clip_max)
    kl_reward = ((prev_sample_mean - prev_sample_mean_ref_lora) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
        2 * std_dev_t**2)
    kl_reward = kl_reward.squeeze(-1).squeeze(-1)
    advantages = torch.clamp(task_advantage + kl_scale * kl_reward, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - logp_old)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref_base) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
        2 * std_dev_t**2)
    return policy_loss + beta * torch.mean(kl_loss)


def _inputs(b: int, seed: int):
    idx, x, v_old, old = states(b, seed=seed)
    gen = torch.Generator().manual_seed(seed + 11)
    v_t, v_a = (v_old + 0.3 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    v0 = v_old + 0.02 * torch.randn(v_old.shape, generator=gen, dtype=torch.float64)
    task = 3.0 * torch.randn(b, generator=gen, dtype=torch.float64)  # some beyond adv_clip = 5 after the sum
    return idx, x, old, v_t, v_a, v0, task


@pytest.mark.parametrize("b,seed,clip_range", [(5, 0, 1e-4), (7, 1, 0.03), (3, 2, 1e-4)])
def test_mixed_is_flow_opds_code_loss_and_gradient(b: int, seed: int, clip_range: float) -> None:
    """Fresh random states, velocities and task advantages: loss and gradient equal the float64 transcription
    (A[i, j] = clamp(clamp(t_j) - kl_i) against r_j: the pairs Flow-OPD's broadcasting makes)."""
    idx, x, old, v_t, v_a, v0, task = _inputs(b, seed)
    ours, ref = v0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    cfg = OPDConfig(loss="mixed", beta=0.04, clip_range=clip_range, advantage_pairs=True)
    tr = transition(idx, x, old.sample, old.log_prob.double())
    tr.task_advantage = task
    out = opd_loss(cfg, ours, v_t, tr, v_a)
    expected = flow_opd_mixed(ref, v_t, v_a, x, old.sample, idx, old.log_prob.double(), task, 0.04, clip_range)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-9)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=2e-3, atol=1e-6)


def test_mixed_with_zero_task_advantage_is_kl_only_and_per_sample_form() -> None:
    """t = 0: mixed == kl_only bit for bit (both pair forms); per sample A_i = clamp(clamp(t_i) - kl_i)."""
    idx, x, old, v_t, v_a, v0, task = _inputs(6, 4)
    for pairs in (True, False):
        a, b = v0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        tr = transition(idx, x, old.sample, old.log_prob.double())
        kl_only = opd_loss(OPDConfig(loss="kl_only", beta=0.04, advantage_pairs=pairs), a, v_t, tr, v_a)
        tr.task_advantage = torch.zeros(6, dtype=torch.float64)
        mixed = opd_loss(OPDConfig(loss="mixed", beta=0.04, advantage_pairs=pairs), b, v_t, tr, v_a)
        assert torch.equal(kl_only.loss, mixed.loss)
        kl_only.loss.backward()
        mixed.loss.backward()
        assert torch.equal(a.grad, b.grad)
    # per sample: at r = 1 (logp_old = the student's own log-prob) the loss is -mean(A_i)
    tr = transition(idx, x, old.sample, None)
    _, mean, std = flow_grpo_step(v0, x, SIG[idx], SIG[idx + 1], SIG[1], old.sample)
    logp, _, _ = flow_grpo_step(v0, x, SIG[idx], SIG[idx + 1], SIG[1], old.sample)
    tr.logp_old, tr.task_advantage = logp, task
    out = opd_loss(OPDConfig(loss="mixed", beta=0.0, advantage_pairs=False), v0.clone(), v_t, tr, None)
    _, mean_t, _ = flow_grpo_step(v_t, x, SIG[idx], SIG[idx + 1], SIG[1], old.sample)
    kl = ((mean - mean_t) ** 2).mean(dim=(1, 2, 3)) / (2 * std.flatten() ** 2)
    expected = -torch.clamp(torch.clamp(task, -5, 5) - kl, -5, 5).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_mixed_without_task_advantages_is_refused() -> None:
    idx, x, old, v_t, v_a, v0, _ = _inputs(3, 5)
    with pytest.raises(ValueError, match="mixed.*rl.rewards"):
        opd_loss(OPDConfig(loss="mixed"), v0, v_t, transition(idx, x, old.sample, old.log_prob.double()), v_a)


def test_mixed_config_needs_rewards_and_groups() -> None:
    with pytest.raises(ConfigError, match=r"opd.loss = 'mixed'.*rl.rewards"):
        load_config(None, ["opd.loss=mixed"])
    with pytest.raises(ConfigError, match=r"opd.loss = 'mixed'.*group_size"):
        load_config(None, ["opd.loss=mixed", "rollout.group_size=1", 'rl.rewards={"*" = {"toy:task" = 1.0}}',
                           'rl.scorers={"toy:task" = ""}'])


SMALL = ["opd.loss=mixed", "rollout.steps=4", "rollout.group_size=2", "train.prompts_per_step=2", "train.save_every=2",
         "report.eval_every=0", "validation.every=0", 'rl.rewards={"*" = {"toy:task" = 1.0}}',
         'rl.scorers={"toy:task" = ""}']


def _train(out: Path, steps: int) -> list[dict]:
    from engine.trainer import Trainer

    trainer = Trainer(load_config(None, [*SMALL, f"train.steps={steps}", f'output_dir="{out}"']))
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.mark.slow  # ~30 s on 2 cores
def test_a_mixed_run_rewards_its_rollouts_and_resumes_exactly(tmp_path: Path) -> None:
    """The default toy config as Flow-OPD's mixed mode, 4 tiny steps: each row carries its rollouts' task reward
    and a non-zero mean advantage; 2 steps then a resume to 4 give the same rows (rewards are deterministic)."""
    rows = _train(tmp_path / "a", 4)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and r["reward_std"] > 0 and r["advantage"] != 0 for r in rows)
    first = _train(tmp_path / "b", 2)
    rest = _train(tmp_path / "b", 4)
    keys = ("loss", "reward", "advantage", "grad_norm", "data_crc")
    assert [[r[k] for k in keys] for r in first + rest] == [[r[k] for k in keys] for r in rows]
