"""`model.attention_backend`: which SDPA kernels `auto` tries on which device (capabilities injected, so the Hopper
rule is tested on the CPU), the single-kernel choices and their fallback, and the reference processor under a
kernel choice (issue 18). Numerics of each kernel on a GPU: tests/test_fused_attention.py::test_cuda_bf16_each_backend.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch.nn.attention import SDPBackend

from engine.backends.sd3 import attention as fa
from engine.backends.sd3 import sdpa
from engine.backends.sd3.backend import SD3Backend, predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import get_preset

HOPPER, AMPERE = (9, 0), (8, 0)


@pytest.mark.parametrize(("device", "cap", "dtype", "order"), [
    ("cuda", HOPPER, torch.bfloat16, ("cudnn", "flash", "efficient", "math")),
    ("cuda", HOPPER, torch.float16, ("cudnn", "flash", "efficient", "math")),
    ("cuda", (10, 0), torch.bfloat16, ("cudnn", "flash", "efficient", "math")),
    ("cuda", AMPERE, torch.bfloat16, ("flash", "efficient", "cudnn", "math")),
    ("cuda", HOPPER, torch.float32, ("efficient", "math")),
    ("cpu", None, torch.bfloat16, None),
])
def test_auto_order_prefers_cudnn_on_hopper(device, cap, dtype, order) -> None:
    assert sdpa.auto_order(device, cap, dtype) == order
    assert sdpa.sdpa_kernels("auto", device, cap, dtype) == order
    assert sdpa.sdpa_kernels("sdpa", device, cap, dtype) is None  # torch's own order
    assert sdpa.sdpa_kernels("sdpa-math", device, cap, dtype) == ("math",)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list, dict]]:
    calls: list[tuple[list, dict]] = []
    real = sdpa.sdpa_kernel

    def spy(backends, **kwargs):
        calls.append((list(backends), kwargs))
        return real(backends, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_kernel", spy)
    return calls


def test_auto_on_a_hopper_device_runs_sdpa_under_that_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """The context handed to torch: cuDNN, flash, efficient, math with set_priority (torch >= 2.6), for an injected
    H100/H200; the call still runs (here on the CPU, where torch takes the first kernel that exists: flash)."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(sdpa, "device_of", lambda t: ("cuda", HOPPER))
    q, k, v = (torch.randn(2, 9, 3, 8, dtype=torch.bfloat16) for _ in range(3))
    out = sdpa.attention_bshd(q, k, v, "auto")
    assert calls == [([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH], {"set_priority": True} if sdpa._HAS_PRIORITY else {})]
    torch.testing.assert_close(out, sdpa.attention_bshd(q, k, v, "sdpa"))
    monkeypatch.setattr(sdpa, "device_of", lambda t: ("cpu", None))
    calls.clear()
    sdpa.attention_bshd(q, k, v, "auto")
    assert calls == []  # CPU: no restriction at all


def test_a_single_sdpa_kernel_that_cannot_run_falls_back_with_one_line(monkeypatch, caplog) -> None:
    monkeypatch.setattr(sdpa, "_WARNED", set())
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out = sdpa.attention_bshd(q, k, v, "sdpa-cudnn")  # no cuDNN attention on the CPU
        sdpa.attention_bshd(q, k, v, "sdpa-cudnn")
    assert sum("'sdpa-cudnn' cannot run" in r.getMessage() for r in caplog.records) == 1, caplog.text
    torch.testing.assert_close(out, sdpa.attention_bshd(q, k, v, "sdpa"))
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, -1)
    torch.testing.assert_close(sdpa.attention_bshd(q, k, v, "sdpa-math"), torch.einsum("bhqk,bkhd->bqhd", ref, v))


def _model() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**get_preset("tiny").transformer).eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, SD3Cond]:
    p = get_preset("tiny")
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, p.latent_channels, p.latent_size, p.latent_size, generator=g),
            torch.rand(batch, generator=g),
            SD3Cond(torch.randn(batch, p.text_seq_len, p.joint_attention_dim, generator=g),
                    torch.randn(batch, p.pooled_projection_dim, generator=g)))


def test_reference_processor_under_a_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.attention = "reference"`: `sdpa` leaves diffusers' processors as loaded; `sdpa-math` / `auto` wrap their
    SDPA call in the kernel choice (one context per attention call) and compute the same function."""
    model = _model()
    backend = SD3Backend()
    loaded = [m.processor for m in fa._joint_attention_modules(model)]
    backend.install_attention(model, "reference", "sdpa")
    assert [m.processor for m in fa._joint_attention_modules(model)] == loaded  # untouched
    x, sigma, cond = _inputs()
    with torch.no_grad():
        ref = predict_velocity(model, x, sigma, cond)
    backend.install_attention(model, "reference", "sdpa-math")
    procs = [m.processor for m in fa._joint_attention_modules(model)]
    assert len(procs) == 3 and all(type(p) is fa.KernelChoiceProcessor and p.backend == "sdpa-math" for p in procs)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        out = predict_velocity(model, x, sigma, cond)
    assert [c[0] for c in calls] == [[SDPBackend.MATH]] * 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert fa.uninstall_fused_attention(model) == 3
    assert all(type(m.processor) is JointAttnProcessor2_0 for m in fa._joint_attention_modules(model))
    with pytest.raises(ValueError, match="runs SDPA only"):
        fa.KernelChoiceProcessor("xformers")


def test_fused_processor_with_auto_and_a_single_kernel_equals_the_reference() -> None:
    model = _model()
    x, sigma, cond = _inputs()
    with torch.no_grad():
        ref = predict_velocity(model, x, sigma, cond)
        for backend in ("auto", "sdpa-math"):
            assert fa.install_fused_attention(model, backend=backend) == 3
            torch.testing.assert_close(predict_velocity(model, x, sigma, cond), ref, atol=1e-5, rtol=1e-5)
