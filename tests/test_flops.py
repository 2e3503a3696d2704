"""engine/flops.py against torch.utils.flop_counter on the real diffusers model (SDPA forced to its math backend,
whose bmm's the counter sees; the fused CPU kernel is not counted): tiny forward/backward, SD3.5-M forward on
the meta device, and one whole OPD train step of the tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.adapters.lora import STUDENT, AdapterSwitch
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.flops import (
    FlopCount,
    Lora,
    MMDiTDims,
    backward_flops,
    forward_flops,
    iteration_flops,
    opd_iteration_shape,
)
from engine.backends.sd3.presets import PRESETS
from tests.helpers import TINY, randomize_student, tiny_inputs, tiny_model

REPO = Path(__file__).resolve().parents[1]
DIMS = MMDiTDims.from_config(TINY.transformer)


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("adapter,rank", [(None, 0), ("t1", 5), (STUDENT, 4)])
def test_forward_matches_flop_counter(adapter: str | None, rank: int) -> None:
    model = tiny_model(teachers=2, rank=4)  # teacher t1 has rank 5
    AdapterSwitch(model).activate(adapter)
    x, sigma, cond = tiny_inputs(b=3)
    with torch.no_grad():
        counted = _counted(lambda: predict_velocity(model, x, sigma, cond))
    want = forward_flops(DIMS, TINY.latent_size, TINY.text_seq_len, Lora(rank) if adapter else None)
    assert counted == 3 * want.total


def test_student_backward_matches_flop_counter() -> None:
    model = tiny_model(teachers=0, rank=4)
    randomize_student(model)
    AdapterSwitch(model).activate(STUDENT)
    x, sigma, cond = tiny_inputs(b=3)
    out: list[torch.Tensor] = []
    fwd = _counted(lambda: out.append(predict_velocity(model, x, sigma, cond)))
    bwd = _counted(lambda: out[0].square().mean().backward())
    assert fwd == 3 * forward_flops(DIMS, TINY.latent_size, TINY.text_seq_len, Lora(4)).total
    assert bwd == 3 * backward_flops(DIMS, TINY.latent_size, TINY.text_seq_len, Lora(4)).total


def test_sd35_medium_forward_on_meta_matches_flop_counter() -> None:
    """The real SD3.5-M architecture at 512 px (64x64 latent, 333 text tokens), counted without computing."""
    from diffusers import SD3Transformer2DModel

    p = PRESETS["sd35-medium"]
    with torch.device("meta"):
        model = SD3Transformer2DModel(**p.transformer)
        x = torch.empty(1, p.latent_channels, p.latent_size, p.latent_size)
        cond = SD3Cond(torch.empty(1, p.text_seq_len, p.joint_attention_dim), torch.empty(1, p.pooled_projection_dim))
        sigma = torch.empty(1)
    with torch.no_grad():
        counted = _counted(lambda: predict_velocity(model, x, sigma, cond))
    want = forward_flops(MMDiTDims.from_config(p.transformer), p.latent_size, p.text_seq_len)
    assert counted == want.total
    assert want.image > want.text > 0 and want.attention > 0  # per modality, not 2 x params x tokens


def test_flop_count_arithmetic_and_lora_target_checks() -> None:
    a, b = FlopCount(image=1, text=2, attention=3, conditioning=4, lora=5), FlopCount(image=10)
    assert (a + b).image == 11 and (2 * a).total == 30 and (a * 2).as_dict()["total"] == 30
    with pytest.raises(ValueError, match="ff.net.0.proj"):
        Lora(4, ("to_q", "ff.net.0.proj"))
    with pytest.raises(ValueError, match="q/k/v"):
        Lora(4, ("to_out.0",))


@pytest.mark.slow
def test_opd_train_step_matches_flop_counter(tmp_path: Path) -> None:
    """Every model FLOP of one tiny-config train step (CFG rollout, routed CFG teachers, anchor, dense query
    states, student forward + backward, DeepSpeed step) is the count the iteration benchmark reports."""
    from engine.config import load_config
    from engine.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny.toml", ["rollout.steps=3", "train.steps=1", "train.save_every=0",
                                                        f'output_dir="{tmp_path}"'])
    trainer = Trainer(cfg)
    try:
        draw = trainer.router.draw(0)
        routes = trainer.router.route(0, trainer.sampler.batch(0, 0, draw.pool, draw.key, draw.pool_step).tasks)
        ranks = {f.name: None if f.adapter is None else trainer.model.peft_config[f.adapter].r
                 for f in trainer.fields.values()}
        shape = opd_iteration_shape(cfg, ranks, routes)
        counted = _counted(lambda: trainer.train_step(0))
    finally:
        trainer.close()
    phases = iteration_flops(DIMS, TINY.latent_size, TINY.text_seq_len, shape)
    assert shape.rows == 4 and shape.chunks == 2 and len(shape.field_rows) == 8
    assert counted == sum(p.total for p in phases.values())
