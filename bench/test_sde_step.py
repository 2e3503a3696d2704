"""SDE step: the unfused PyTorch chain (as in the public Flow-GRPO code) vs the fused Triton and CUDA kernels.

    pytest bench/test_sde_step.py -s                                                  (table on stdout)
    pytest bench/test_sde_step.py --benchmark-json=bench/results/sde_step_h100.json

Workloads, batch 16, 16 latent channels, bf16 (FLOWOPD_BENCH_DTYPE=float32|float16 to change):
- `rollout`: CFG-guided step with fresh noise: reads x, v_u, v_c; writes x' and log_prob. The reference is
  cfg_combine + sde_step_ref (torch.randn inside), as Flow-GRPO's pipeline and sde_step_with_logprob run it;
  the kernels fuse the combination and draw Philox noise in-kernel.
- `rescore`: the training loss's re-scoring of a stored transition: reads x, v, prev_sample; writes mu and
  log_prob.
Shapes 16x64x64 (512 px) and 16x128x128 (1024 px) on CUDA; one small shape on CPU, where the reference and
the Triton kernel in its interpreter run eagerly as a smoke test of this file (interpreter times say nothing
about a GPU; `triton_interpreted` marks them); the C++ ops and graph mode need a GPU. Modes: `eager` (launches
from Python) and `graph` (the step captured once in a CUDA graph and replayed, as the graph rollout runs it).
Reported (extra_info, and a line on stdout): microseconds per step, effective GB/s = the minimal traffic
(4 tensors of B*C*H*W elements + [B] outputs) / time, that as a fraction of the device-to-device copy
bandwidth measured in the same run (copy of 256 MiB, read + write counted), and `speedup_vs_reference` (the
unfused chain's median / this median, same workload, shape and mode). Issue goal on H100: fused >= 80% of copy
bandwidth at 1024 px and >= 20x the unfused chain.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable

import pytest
import torch

from engine.ops import cfg_combine_ref, sde_step_ref
from engine.sampling.schedule import flow_match_sigmas

CUDA = torch.cuda.is_available()
SHAPES = [(16, 16, 64, 64), (16, 16, 128, 128)] if CUDA else [(2, 16, 16, 16)]
PROVIDERS = ("reference", "triton", "cuda")
STEPS_PER_ROUND = 50 if CUDA else 3  # launches timed together: one sync per round, not per ~10 us step
ROUNDS = 20 if CUDA else 3
DTYPE = getattr(torch, os.environ.get("FLOWOPD_BENCH_DTYPE", "bfloat16"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_MEDIANS: dict[tuple, float] = {}  # (workload, shape, mode) -> reference seconds per step, for the speedup


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def copy_gbps() -> float | None:
    """Device-to-device copy bandwidth (GB/s, read + write) of a 256 MiB buffer, median of 20 timed copies."""
    if not CUDA:
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9


def _step_fn(workload: str, provider: str, shape: tuple[int, ...]) -> Callable[[], object]:
    device = torch.device("cuda" if CUDA else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda: torch.randn(shape, generator=gen, device=device).to(DTYPE)  # noqa: E731
    b = shape[0]
    sigmas = flow_match_sigmas(10, 3.0).to(device)
    step = torch.full((b,), 4, dtype=torch.int64, device=device)
    sigma, sigma_next, sigma_1 = sigmas[step], sigmas[step + 1], sigmas[1]
    x = randn()
    if provider == "reference":
        if workload == "rollout":
            vu, vc = randn(), randn()
            return lambda: sde_step_ref(x, cfg_combine_ref(vu, vc, 4.5), sigma, sigma_next, sigma_1, 0.7)
        v, prev = randn(), randn()
        return lambda: sde_step_ref(x, v, sigma, sigma_next, sigma_1, 0.7, prev_sample=prev)
    from kernels.sde_step import sde_step_indexed

    if workload == "rollout":
        vu, vc = randn(), randn()
        seed = torch.ones(1, dtype=torch.int64, device=device)
        return lambda: sde_step_indexed(x, None, sigmas, step, 0.7, v_uncond=vu, v_cond=vc, guidance=4.5, seed=seed,
                                        offset=step[:1], return_mean=False, backend=provider)
    v, prev = randn(), randn()
    return lambda: sde_step_indexed(x, v, sigmas, step, 0.7, prev_sample=prev, backend=provider)


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _versions() -> dict[str, str]:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda),
            "commit": commit}  # fmt: skip


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("workload", ["rollout", "rescore"])
def test_sde_step(benchmark, workload: str, shape: tuple[int, ...], provider: str, mode: str,
                  copy_gbps: float | None) -> None:
    if provider == "triton" and not (CUDA or INTERPRETED):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if provider == "cuda":
        from kernels.native import native_available

        if not native_available():
            pytest.skip("native ops not built (pip install -e . with a CUDA toolchain, or the CMake build)")
    if mode == "graph" and not CUDA:
        pytest.skip("CUDA graphs need a GPU")
    fn = _step_fn(workload, provider, shape)
    with torch.no_grad():
        fn()  # warm-up: Triton compile, allocator
        call = _graphed(fn) if mode == "graph" else fn
    _sync()
    times: list[float] = []

    def run() -> None:
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(STEPS_PER_ROUND):
                call()
        _sync()
        times.append((time.perf_counter() - t0) / STEPS_PER_ROUND)

    run()
    times.clear()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    sec = statistics.median(times)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = 4 * numel * torch.tensor([], dtype=DTYPE).element_size() + 8 * shape[0]
    gbps = nbytes / sec / 1e9
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": str(DTYPE).replace("torch.", ""),
        "shape": list(shape),
        "workload": workload,
        "provider": provider,
        "mode": mode,
        "us_per_step": sec * 1e6,
        "bytes_per_step": nbytes,
        "gb_per_s": gbps,
        "copy_gb_per_s": copy_gbps,
        "fraction_of_copy": gbps / copy_gbps if copy_gbps else None,
        "triton_interpreted": provider == "triton" and not CUDA,
        **_versions(),
    }
    key = (workload, tuple(shape), mode)
    if provider == "reference":
        _MEDIANS[key] = sec
    elif key in _MEDIANS:
        info["speedup_vs_reference"] = _MEDIANS[key] / sec
    benchmark.extra_info.update(info)
    frac = f"{info['fraction_of_copy']:6.1%} of copy" if copy_gbps else ""
    if "speedup_vs_reference" in info:
        frac += f" {info['speedup_vs_reference']:6.2f}x ref"
    print(f"\n[sde_step] {info['device']} {info['dtype']} {workload:7} {'x'.join(map(str, shape)):>13} "
          f"{provider:>9} {mode:5}: {sec * 1e6:9.1f} us  {gbps:8.1f} GB/s {frac}")
