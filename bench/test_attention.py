"""Throughput of one SD3.5-M joint block with a LoRA student: FusedJointAttnProcessor vs diffusers + peft.

Run (GPU): `python -m pytest bench/test_attention.py --benchmark-enable --benchmark-json=bench/results/attention.json`
(add `-k "seq1024 and dual"` etc. to narrow). On CPU the same file runs a tiny shape as a smoke test;
GPU-only providers (flash-attn, xformers) skip, and torch.compile providers skip unless
FLOWOPD_BENCH_COMPILE=1, on a GPU too (compiling costs ~100 s per provider on 2 CPU cores, and 16 builds do not fit
the GPU suite's step).

Three groups, each comparing providers side by side:
- `block`: the whole JointTransformerBlock (bf16, LoRA r=32 alpha=64 on the 8 attention projections of the
  student adapter, batch 16, 1024 or 4096 image + 333 text tokens), forward (rollout/teacher, no_grad) and
  forward+backward (student: LoRA params and block inputs need grads). Providers: diffusers+peft eager and
  torch.compile'd, ours (sdpa / auto = cuDNN first on Hopper / flash / xformers) eager and compiled. Speedup vs
  diffusers+peft in extra_info.
- `qkv`: the image-stream q|k|v projection alone: plain GEMM against the concatenated base weights (the goal's
  yardstick: ours within 1.10x), ours (LoRA folded in), peft (three lora.Linear calls).
- `attn`: the attention core on the joint [B, S, 24, 64] q/k/v, per backend of engine/backends/sd3/sdpa.py (auto,
  sdpa and each SDPA kernel alone; goal: >= 400 TFLOP/s forward at 1024+333 on H100).

FLOPs count useful work per modality (separate image/text weights), not 2 * params * tokens:
GEMMs 2*M*N*K, LoRA as peft computes it (shrink + expand, 4*N*d*r per target), attention 4*B*S^2*H*D
(softmax not counted). Backward of the frozen-base student: input-grad GEMMs (1x their forward), LoRA 2x its
forward, attention 2.5x its forward (5 matmuls vs 2); base weight grads are not computed (frozen).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import subprocess

import pytest
import torch
from diffusers import SD3Transformer2DModel

from engine.adapters.lora import STUDENT, LoraSpec, freeze_for_training, random_adapter
from engine.backends.sd3 import attention as fa
from engine.backends.sd3 import sdpa
from engine.backends.sd3.presets import get_preset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16
if CUDA:
    PRESET = dict(get_preset("sd35-medium").transformer)
    BATCH, RANK, ALPHA = 16, 32, 64
    SEQS = {"seq1024": (1024, 333), "seq4096": (4096, 333)}
else:  # smoke-test size: same code paths, seconds on 2 cores
    PRESET = dict(get_preset("tiny").transformer)
    PRESET.update(attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64)
    BATCH, RANK, ALPHA = 2, 4, 8
    SEQS = {"seq64": (64, 16)}
DIM = PRESET["attention_head_dim"] * PRESET["num_attention_heads"]
HEADS, HEAD_DIM = PRESET["num_attention_heads"], PRESET["attention_head_dim"]
# torch.compile providers only when asked: 16 Inductor builds do not fit a GPU lease's step (issue 18)
COMPILE = os.environ.get("FLOWOPD_BENCH_COMPILE") == "1"
PROVIDERS = [
    "diffusers+peft",
    "diffusers+peft+compile",
    "ours-sdpa",
    "ours-auto",
    "ours-sdpa+compile",
    "ours-flash",
    "ours-xformers",
]
_MEDIANS: dict[tuple, float] = {}
# timed rounds per group on a GPU (FLOWOPD_BENCH_ROUNDS sets all three: bench/gpu_suite.sh fits its step with 5)
ROUNDS = {"block": 10, "qkv": 20, "attn": 20} if CUDA else {}
if os.environ.get("FLOWOPD_BENCH_ROUNDS"):
    ROUNDS = dict.fromkeys(("block", "qkv", "attn"), int(os.environ["FLOWOPD_BENCH_ROUNDS"]))


@functools.cache
def _info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    versions = {p: importlib.metadata.version(p) for p in ("torch", "triton", "diffusers", "peft")}
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    # on CPU the QK-norm kernel of `ours` runs in the Triton interpreter: those times say nothing about a GPU
    interpreted = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
    return {"device": device, "dtype": str(DTYPE), "commit": commit, "triton_interpreted": interpreted, **versions}


# --------------------------------------------------------------------------------------------- FLOPs


def block_flops(s_img: int, s_txt: int, dual: bool, backward: bool) -> float:
    """Useful FLOPs of one non-final JointTransformerBlock on BATCH samples (see the module docstring)."""
    ni, nt, c, b = BATCH * s_img, BATCH * s_txt, DIM, BATCH
    gemm = 2 * b * c * ((9 if dual else 6) * c + 6 * c)  # adaLN-Zero modulations (image, text)
    gemm += 2 * (ni + nt) * c * 3 * c + 2 * (ni + nt) * c * c  # qkv + out, both streams
    gemm += 2 * 2 * (ni + nt) * c * 4 * c  # feed-forwards (4x hidden), both streams
    lora = 4 * (ni + nt) * c * RANK * 4  # 4 LoRA targets per stream
    attn = 4 * b * (s_img + s_txt) ** 2 * c
    if dual:
        gemm += 2 * ni * c * 3 * c + 2 * ni * c * c
        lora += 4 * ni * c * RANK * 4
        attn += 4 * b * s_img**2 * c
    if not backward:
        return float(gemm + lora + attn)
    return float(2 * gemm + 3 * lora + 3.5 * attn)


# --------------------------------------------------------------------------------------------- setup


def _student_block(dual: bool) -> torch.nn.Module:
    """Block 0 of a 2-layer model with SD3.5-M widths: joint (+ image-only attn2 if dual), not context-pre-only."""
    kwargs = dict(PRESET, num_layers=2, dual_attention_layers=(0,) if dual else ())
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**kwargs)
    random_adapter(model, STUDENT, LoraSpec(rank=RANK, alpha=ALPHA), seed=1)  # B != 0: the LoRA does work
    freeze_for_training(model)
    return model.transformer_blocks[0].to(DEVICE, DTYPE)


def _provider_block(base: torch.nn.Module, provider: str) -> torch.nn.Module:
    if provider.endswith("+compile") and not COMPILE:
        pytest.skip("torch.compile providers cost ~100 s each on CPU; set FLOWOPD_BENCH_COMPILE=1")
    name = provider.removesuffix("+compile")
    if name in ("ours-flash", "ours-xformers"):
        backend = name.split("-")[1]
        probe = torch.empty(1, 1, 1, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        if not sdpa.attention_backend_usable(backend, probe):
            pytest.skip(f"{backend} is not usable here (needs CUDA and the package)")
    block = copy.deepcopy(base)
    if name.startswith("ours"):
        fa.install_fused_attention(block, backend=name.split("-")[1])
    return torch.compile(block) if provider.endswith("+compile") else block


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _record(benchmark, key: tuple, flops: float, reference: tuple | None = None) -> None:
    benchmark.extra_info.update(dict(_info()))
    benchmark.extra_info["gflop"] = flops / 1e9
    stats = getattr(benchmark, "stats", None)
    if stats is None or stats.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    median = stats.stats.median
    _MEDIANS[key] = median
    benchmark.extra_info["tflops"] = flops / median / 1e12
    if reference is not None and reference in _MEDIANS:
        benchmark.extra_info["speedup"] = _MEDIANS[reference] / median


_BLOCKS: dict[bool, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def blocks():
    yield _BLOCKS
    _BLOCKS.clear()


# --------------------------------------------------------------------------------------------- block


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seq", list(SEQS))
@pytest.mark.parametrize("kind", ["dual", "joint"])
def test_block(benchmark, blocks, kind, seq, mode, provider):
    dual = kind == "dual"
    if dual not in blocks:
        blocks[dual] = _student_block(dual)
    block = _provider_block(blocks[dual], provider)
    s_img, s_txt = SEQS[seq]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hs = torch.randn(BATCH, s_img, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    enc = torch.randn(BATCH, s_txt, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    temb = torch.randn(BATCH, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    lora = [p for p in block.parameters() if p.requires_grad]
    backward = mode == "fwd+bwd"
    if backward:
        hs.requires_grad_(True)
        enc.requires_grad_(True)
        grads = (torch.randn_like(enc), torch.randn_like(hs))

    def step():
        if backward:
            for p in lora:
                p.grad = None
            torch.autograd.backward(block(hs, enc, temb), grads)
        else:
            with torch.no_grad():
                block(hs, enc, temb)
        _sync()

    if provider.startswith("ours"):  # same function as diffusers + peft before timing it
        with torch.no_grad():
            ours = block(hs, enc, temb)
            ref = blocks[dual](hs, enc, temb)
        for a, b in zip(ours, ref):
            assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()
    benchmark.pedantic(step, warmup_rounds=3, rounds=ROUNDS.get("block", 3), iterations=1)
    flops = block_flops(s_img, s_txt, dual, backward)
    eager_ref = (kind, seq, mode, "diffusers+peft")
    _record(benchmark, (kind, seq, mode, provider), flops, None if provider == "diffusers+peft" else eager_ref)
    if provider.startswith("ours") and (kind, seq, mode, "diffusers+peft+compile") in _MEDIANS:
        median = _MEDIANS.get((kind, seq, mode, provider))
        if median is not None:
            benchmark.extra_info["speedup_vs_compiled"] = _MEDIANS[(kind, seq, mode, "diffusers+peft+compile")] / median
    benchmark.extra_info.update(batch=BATCH, s_img=s_img, s_txt=s_txt, dim=DIM, rank=RANK, mode=mode, kind=kind)


# --------------------------------------------------------------------------------------------- qkv projection


@pytest.mark.parametrize("provider", ["plain-gemm", "ours", "peft"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seq", list(SEQS))
def test_qkv_projection(benchmark, blocks, seq, mode, provider):
    if True not in blocks:
        blocks[True] = _student_block(True)
    attn = blocks[True].attn
    s_img = SEQS[seq][0]
    x = torch.randn(BATCH, s_img, DIM, device=DEVICE, dtype=DTYPE)
    backward = mode == "fwd+bwd"
    x.requires_grad_(backward)
    w = torch.cat([m.base_layer.weight for m in (attn.to_q, attn.to_k, attn.to_v)]).detach()
    b = torch.cat([m.base_layer.bias for m in (attn.to_q, attn.to_k, attn.to_v)]).detach()
    lora = [p for m in (attn.to_q, attn.to_k, attn.to_v) for p in m.parameters() if p.requires_grad]

    if provider == "plain-gemm":

        def fwd():
            return torch.nn.functional.linear(x, w, b)
    elif provider == "ours":

        def fwd():
            return fa.project_qkv(attn, x)
    else:

        def fwd():
            return torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1)

    grad = torch.randn(BATCH, s_img, 3 * DIM, device=DEVICE, dtype=DTYPE)

    def step():
        if backward:
            for p in lora:
                p.grad = None
            fwd().backward(grad)
        else:
            with torch.no_grad():
                fwd()
        _sync()

    benchmark.pedantic(step, warmup_rounds=3, rounds=ROUNDS.get("qkv", 3), iterations=1)
    flops = 2 * BATCH * s_img * DIM * 3 * DIM * (2 if backward else 1)  # the plain GEMM's work: the yardstick
    ref = None if provider == "plain-gemm" else (seq, mode, "plain-gemm")
    _record(benchmark, (seq, mode, provider), flops, ref)
    if "speedup" in benchmark.extra_info:
        benchmark.extra_info["time_vs_plain_gemm"] = 1 / benchmark.extra_info.pop("speedup")
    benchmark.extra_info.update(batch=BATCH, tokens=s_img, dim=DIM, rank=RANK, mode=mode)


# --------------------------------------------------------------------------------------------- attention core


@pytest.mark.parametrize("backend", list(sdpa.ATTENTION_BACKENDS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seq", list(SEQS))
def test_attention_core(benchmark, seq, mode, backend):
    s = sum(SEQS[seq])
    q, k, v = (torch.randn(BATCH, s, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(3))
    if backend != "sdpa" and not sdpa.attention_backend_usable(backend, q):
        pytest.skip(f"{backend} is not usable here (needs CUDA and the package)")
    backward = mode == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(backward)
    grad = torch.randn_like(q)

    def step():
        if backward:
            sdpa.attention_bshd(q, k, v, backend).backward(grad)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                sdpa.attention_bshd(q, k, v, backend)
        _sync()

    benchmark.pedantic(step, warmup_rounds=3, rounds=ROUNDS.get("attn", 3), iterations=1)
    flops = 4 * BATCH * s * s * HEADS * HEAD_DIM * (3.5 if backward else 1)
    _record(benchmark, (seq, mode, backend), flops, None if backend == "sdpa" else (seq, mode, "sdpa"))
    benchmark.extra_info.update(batch=BATCH, seq=s, heads=HEADS, head_dim=HEAD_DIM, mode=mode)
