"""The timestep reaching the SD3 transformer is float32 whatever the model dtype (issue 18).

diffusers' StableDiffusion3Pipeline passes the scheduler's float32 timesteps and `Timesteps` casts only its
sinusoidal output to the weights' dtype; a bf16 timestep moves 913.35 to 912 (DESIGN §1). The teachers were
trained with float32 t, so `predict_velocity` must give exactly what the pipeline's own transformer call gives.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import get_preset
from engine.sampling.schedule import flow_match_sigmas

PRESET = get_preset("tiny")


def _model(dtype: torch.dtype) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**PRESET.transformer).to(dtype).eval()


def _cond(batch: int) -> SD3Cond:
    g = torch.Generator().manual_seed(1)
    return SD3Cond(torch.randn(batch, PRESET.text_seq_len, PRESET.joint_attention_dim, generator=g),
                   torch.randn(batch, PRESET.pooled_projection_dim, generator=g))


class _Capture:
    """Forward pre/post hooks recording the transformer's keyword inputs and its output of every call."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[dict] = []
        self.outputs: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda m, args, kwargs: self.calls.append(dict(kwargs)), with_kwargs=True)
        model.register_forward_hook(lambda m, args, kwargs, out: self.outputs.append(out[0]), with_kwargs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_timestep_reaching_the_model_is_float32(dtype: torch.dtype) -> None:
    model = _model(dtype)
    cap = _Capture(model)
    sigmas = flow_match_sigmas(10, 3.0)
    sigma = sigmas[[1, 2, 5]]  # 2: sigma 0.91335, the timestep a bf16 cast moves to 912
    x = torch.randn(3, PRESET.latent_channels, PRESET.latent_size, PRESET.latent_size)
    with torch.no_grad():
        predict_velocity(model, x, sigma, _cond(3))
    t = cap.calls[0]["timestep"]
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, sigma * 1000, rtol=0, atol=0)
    assert abs(float(t[1]) - 913.35) < 0.01 and float(t[1].bfloat16()) == 912.0
    assert cap.calls[0]["hidden_states"].dtype == dtype  # everything else is in the model's dtype


def test_predict_velocity_equals_the_diffusers_pipeline_call_in_bf16() -> None:
    """Every transformer call of a 10-step pipeline run (bf16 weights) is reproduced bit for bit from the same
    latent and sigma = t / 1000; a bf16-cast timestep would not reproduce it (the test can fail)."""
    model = _model(torch.bfloat16)
    cap = _Capture(model)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    cond = _cond(2)
    with torch.no_grad():
        pipe(prompt_embeds=cond.prompt_embeds.bfloat16(), pooled_prompt_embeds=cond.pooled.bfloat16(),
             num_inference_steps=10, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        calls, outputs = list(cap.calls), list(cap.outputs)
        assert len(calls) == 10 and all(c["timestep"].dtype == torch.float32 for c in calls)
        moved = 0
        for call, out in zip(calls, outputs):
            x, t = call["hidden_states"], call["timestep"]
            ours = predict_velocity(model, x, t / 1000, cond)
            assert torch.equal(ours, out), f"t = {float(t[0])}"
            cast = model(hidden_states=x, encoder_hidden_states=call["encoder_hidden_states"],
                         pooled_projections=call["pooled_projections"], timestep=t.bfloat16(), return_dict=False)[0]
            moved += not torch.equal(cast, out)
    assert moved >= 5, "a bf16 timestep changes most calls' outputs"
