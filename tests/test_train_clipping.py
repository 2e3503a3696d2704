"""`train.grad_clip` reaches DeepSpeed and clips the global gradient norm; `grad_norm` in the metrics is the norm
before clipping. Read off Adam's first moment after the first step: exp_avg = (1 - beta1) * applied gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["rollout.steps=3", "rollout.group_size=1", "train.steps=1", "train.save_every=0"]


def first_step(out: Path, clip: float) -> tuple[float, float]:
    """(grad_norm logged for step 0, norm of the gradient the optimizer applied)."""
    from engine.trainer import Trainer

    trainer = Trainer(load_config(REPO / "configs" / "tiny.toml", [*FAST, f"train.grad_clip={clip}",
                                                                    f'output_dir="{out}"']))
    try:
        row = trainer.train_step(0)
        beta1 = trainer.config.train.betas[0]
        (state,) = trainer.engine.optimizer.optimizer.state.values()  # one ZeRO partition: the whole student
        applied = float(state["exp_avg"].double().norm()) / (1 - beta1)
    finally:
        trainer.close()
    assert not row["skipped"]
    return row["grad_norm"], applied


def test_grad_clip_limits_the_applied_gradient_norm(tmp_path: Path) -> None:
    norm, applied = first_step(tmp_path / "free", 0.0)
    assert applied == pytest.approx(norm, rel=1e-5)  # unclipped: the whole gradient
    clip = norm / 8
    norm_c, applied_c = first_step(tmp_path / "clipped", clip)
    assert norm_c == norm  # the same step: the logged norm is the one before clipping
    # DeepSpeed scales by clip / (norm + 1e-6); the 1e-6 is ~1e-3 of this tiny model's gradient norm
    assert applied_c == pytest.approx(clip, rel=5e-3) and applied_c < norm / 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
