"""`model.compile = "blocks"` (issue 18): regional torch.compile of the transformer blocks gives the eager model's
outputs and LoRA gradients. On the CPU the graphs go through dynamo + AOTAutograd (`aot_eager`: Inductor's CPU
code generation takes ~160 s for the tiny model's first forward on 2 cores); Inductor itself runs in the CUDA test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

from engine.adapters.lora import STUDENT, LoraSpec, freeze_for_training, random_adapter
from engine.backends.sd3 import attention as fa
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import get_preset
from engine.config import ConfigError, load_config
from engine.student import compile_blocks

PRESET = get_preset("tiny")


def _model(attention: str) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**PRESET.transformer)
    random_adapter(model, STUDENT, LoraSpec(rank=4, alpha=8), seed=3)  # B != 0: the LoRA does work
    freeze_for_training(model, STUDENT)
    if attention == "fused":
        fa.install_fused_attention(model, backend="sdpa-math")  # a kernel choice inside the compiled region
    return model.eval()


def _inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, PRESET.latent_channels, PRESET.latent_size, PRESET.latent_size, generator=g)
    cond = SD3Cond(torch.randn(3, PRESET.text_seq_len, PRESET.joint_attention_dim, generator=g),
                   torch.randn(3, PRESET.pooled_projection_dim, generator=g))
    return x.to(device, dtype), torch.rand(3, generator=g).to(device), cond.to(device, dtype)


def _run(model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    v = predict_velocity(model, *inputs)
    (v.float() ** 2).mean().backward()
    return v.detach(), [p.grad.clone() for p in params]


def test_model_compile_blocks_compiles_every_block_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import get_backend
    from engine.student import build_student

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: calls.append((type(self).__name__, kw.get("backend"))))
    model, _ = build_student(load_config(None, ['model.compile="blocks"']), get_backend("sd3"))
    blocks = len(model.transformer_blocks)
    assert blocks >= 2 and calls == [("JointTransformerBlock", "inductor")] * blocks  # every block, nothing else
    assert build_student(load_config(None), get_backend("sd3")) and len(calls) == blocks  # default: none
    with pytest.raises(ConfigError, match=r"model.compile = 'all'; valid: none, blocks"):
        load_config(None, ['model.compile="all"'])


@pytest.mark.slow  # dynamo + AOTAutograd tracing of the tiny model's two block structures: ~45 s each on 2 cores
@pytest.mark.parametrize("attention", ["reference", "fused"])
def test_compiled_blocks_equal_eager_forward_and_backward(attention: str) -> None:
    eager = _model(attention)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == 2
    inputs = _inputs()
    v_ref, g_ref = _run(eager, inputs)
    for _ in range(2):  # the second call runs the cached graphs
        v, g = _run(compiled, inputs)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=1e-4)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["reference", "fused"])
def test_cuda_inductor_blocks_equal_eager_in_bf16(attention: str) -> None:
    """Inductor's generated kernels on the GPU: bf16 outputs and grads within 2x of eager's distance to float64."""
    eager = _model(attention).cuda().bfloat16()
    gold = copy.deepcopy(eager).double()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    inputs = _inputs("cuda", torch.bfloat16)
    v_ref, g_ref = _run(eager, inputs)
    v_gold, g_gold = _run(gold, (inputs[0].double(), inputs[1], inputs[2].to(dtype=torch.float64)))
    v, g = _run(compiled, inputs)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).norm() / b.norm())

    assert err(v, v_gold) <= 2 * err(v_ref, v_gold) + 1e-3
    for a, b, c in zip(g, g_ref, g_gold):
        assert err(a, c) <= 2 * err(b, c) + 1e-2
