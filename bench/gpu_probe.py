"""GPU probe: the measurements behind three open choices of the fast path, in one process (bench/gpu_suite.sh step
`probe`; on a CPU it runs the same code at smoke sizes, which says nothing about speed).

    python bench/gpu_probe.py --out probe.json [--parts sdpa,checkpointing,lora_merge]

1. `sdpa`: the attention core at SD3.5-M shapes (batch 16, 24 heads x 64, 1024 + 333 and 4096 + 333 tokens, bf16)
   through each SDPA kernel alone (cuDNN, flash, efficient, math), torch's own choice (`sdpa`) and ours (`auto`):
   forward and forward + backward time, TFLOP/s (4 B S^2 H D forward, 3.5x that with the backward), the kernels
   the profiler saw for `sdpa` and `auto`, and the error against float32 math on two samples. Decides
   `model.attention_backend = "auto"` (DESIGN §3: cuDNN 373-395 vs FA2 306-318 TFLOP/s on an H100 at head dim 64).
2. `checkpointing`: the student's forward + backward (SD3.5-M bf16, LoRA r 32 on the attention projections, 32
   rows = 16 images x [uncond; cond], 512 px) with gradient checkpointing on and off: seconds and peak memory
   (an OOM is recorded as such). Decides whether the recipes need `model.gradient_checkpointing` on 141 GB.
3. `lora_merge`: one 1536 x 1536 projection, 4 frozen rank-32 adapters, segments of m token rows each:
   segmented LoRA (op `lora_segmented`) against the merged-weight path (W + s B A per segment, one GEMM each) for
   m = 256 .. 16384. The smallest m where merging wins is `kernels.lora_merge_rows` (predicted ~1024: DESIGN's
   traffic model 2 N K / (K + 2 N), docs/multi_lora.md).

Each part is timed with CUDA events (median of repeats after warm-up; perf_counter on a CPU), runs under its own
try/except (a failure is recorded and the next part runs), and the JSON is rewritten after every part, so a probe
stopped by its time limit still leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of `fn` over `reps` calls after `warmup` (CUDA events on a GPU, perf_counter on a CPU, where
    it is called once after one warm-up: the smoke run checks the control flow, not the speed)."""
    if not CUDA:
        reps, warmup = 1, 1
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernel_names(fn: Callable[[], object]) -> list[str]:
    """The CUDA kernels one call of `fn` launched, by the profiler (empty on a CPU)."""
    if not CUDA:
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})[:8]


# ------------------------------------------------------------------------------------------------- parts


def part_sdpa() -> dict:
    """Each SDPA kernel at SD3.5-M shapes (module docstring, part 1)."""
    from engine.backends.sd3 import sdpa

    heads, dim, batch = (24, 64, 16) if CUDA else (2, 32, 2)
    seqs = {"1024+333": 1357, "4096+333": 4429} if CUDA else {"64+16": 80}
    backends = ["auto", "sdpa", *(f"sdpa-{k}" for k in sdpa.SDPA_KERNELS)]
    out: dict = {"batch": batch, "heads": heads, "head_dim": dim, "dtype": str(DTYPE), "shapes": {}}
    for name, s in seqs.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(batch, s, heads, dim, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
        grad = torch.randn_like(q)
        ref = sdpa.attention_bshd(*(t[:2].float() for t in (q, k, v)), "sdpa-math")
        flops = 4 * batch * s * s * heads * dim
        rows = {}
        for backend in backends:
            row: dict = {}
            try:
                kernels = sdpa.sdpa_kernels(backend, *sdpa.device_of(q), q.dtype)
                with torch.no_grad(), sdpa.sdpa_context(backend, q):
                    o = sdpa._sdpa(q, k, v)  # no fallback here: a kernel that cannot run is recorded as such
                    row["fwd_ms"] = 1e3 * timed(lambda: sdpa._sdpa(q, k, v))  # noqa: B023
                row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
                row["rel_err_vs_fp32_math"] = float((o[:2].float() - ref).norm() / ref.norm())
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

                def step() -> None:
                    with sdpa.sdpa_context(backend, qg):  # noqa: B023
                        sdpa._sdpa(qg, kg, vg).backward(grad)  # noqa: B023

                row["fwd_bwd_ms"] = 1e3 * timed(step, reps=5)
                row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] * 1e-9
                row["order"] = list(kernels) if kernels else "torch's own"
                if backend in ("auto", "sdpa"):
                    with torch.no_grad(), sdpa.sdpa_context(backend, q):
                        row["cuda_kernels"] = _kernel_names(lambda: sdpa._sdpa(q, k, v))  # noqa: B023
            except RuntimeError as exc:
                row = {"unavailable": str(exc).splitlines()[0][:200]}
            rows[backend] = row
        out["shapes"][name] = rows
    return out


def _student_model():
    """The SD3.5-M transformer (random init, bf16) on the device with the student LoRA and the fused processor, as
    the fast path's student forward runs it (tiny preset on a CPU)."""
    from diffusers import SD3Transformer2DModel

    from engine.adapters.lora import STUDENT, LoraSpec, add_adapter, freeze_for_training
    from engine.backends.sd3.attention import install_fused_attention
    from engine.backends.sd3.presets import get_preset

    preset = get_preset("sd35-medium" if CUDA else "tiny")
    torch.manual_seed(0)
    with DEVICE:
        model = SD3Transformer2DModel(**preset.transformer).to(DTYPE)
    add_adapter(model, STUDENT, LoraSpec(32 if CUDA else 4, 64.0 if CUDA else 8.0))
    model.to(DEVICE, DTYPE)
    freeze_for_training(model, STUDENT)
    install_fused_attention(model, backend="auto")
    return model.eval(), preset


def part_checkpointing() -> dict:
    """The student step with gradient checkpointing on and off (module docstring, part 2)."""
    from engine.backends.sd3.backend import predict_velocity
    from engine.backends.sd3.cond import SD3Cond

    model, p = _student_model()
    rows = 32 if CUDA else 4
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(rows, p.latent_channels, p.latent_size, p.latent_size, device=DEVICE, generator=g)
    sigma = torch.rand(rows, device=DEVICE, generator=g)
    cond = SD3Cond(torch.randn(rows, p.text_seq_len, p.joint_attention_dim, device=DEVICE, generator=g),
                   torch.randn(rows, p.pooled_projection_dim, device=DEVICE, generator=g))
    params = [q for q in model.parameters() if q.requires_grad]

    def step() -> None:
        for q in params:
            q.grad = None
        (predict_velocity(model, x, sigma, cond).float() ** 2).mean().backward()

    out: dict = {"rows": rows, "preset": p.name, "dtype": str(DTYPE), "lora_rank": 32 if CUDA else 4}
    for mode in ("on", "off"):
        if mode == "on":
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            sec = timed(step, reps=3, warmup=1)
            out[mode] = {"s_per_step": sec, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None}
        except torch.OutOfMemoryError as exc:
            out[mode] = {"oom": str(exc).splitlines()[0][:200]}
    if "s_per_step" in out.get("on", {}) and "s_per_step" in out.get("off", {}):
        out["speedup_off_vs_on"] = out["on"]["s_per_step"] / out["off"]["s_per_step"]
    return out


def part_lora_merge() -> dict:
    """Segmented LoRA against merged weights per segment size (module docstring, part 3)."""
    from engine.ops import lora_segmented
    from engine.transfer import device_ints

    n = k = 1536 if CUDA else 64
    r, adapters = (32, 4) if CUDA else (4, 2)
    sizes = (256, 1024, 4096, 16384) if CUDA else (16, 64)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    w = torch.randn(n, k, device=DEVICE, generator=g).to(DTYPE) / k**0.5
    bias = torch.randn(n, device=DEVICE, generator=g).to(DTYPE)
    a = torch.randn(adapters, r, k, device=DEVICE, generator=g).to(DTYPE) / k**0.5
    b = torch.randn(adapters, n, r, device=DEVICE, generator=g).to(DTYPE) / r**0.5
    scales = torch.full((adapters,), 2.0, device=DEVICE)
    rows_out = {}
    for m in sizes:
        x = torch.randn(adapters * m, k, device=DEVICE, generator=g).to(DTYPE)
        indptr = device_ints([i * m for i in range(adapters + 1)], DEVICE, torch.int32)
        ids = device_ints(list(range(adapters)), DEVICE, torch.int32)
        y = torch.empty(adapters * m, n, device=DEVICE, dtype=DTYPE)

        def merged() -> None:
            for i in range(adapters):  # noqa: B023 - what MultiLoraLinear._merged_segments does per large segment
                torch.addmm(bias, x[i * m:(i + 1) * m], torch.addmm(w, b[i], a[i], alpha=2.0).t(),  # noqa: B023
                            out=y[i * m:(i + 1) * m])  # noqa: B023

        with torch.no_grad():
            seg = lora_segmented(x, w, bias, a, b, scales, indptr, ids)
            merged()
            row = {"segmented_ms": 1e3 * timed(lambda: lora_segmented(x, w, bias, a, b, scales, indptr, ids)),  # noqa: B023
                   "merged_ms": 1e3 * timed(merged),
                   "plain_gemm_ms": 1e3 * timed(lambda: F.linear(x, w, bias)),  # noqa: B023
                   "max_abs_diff": float((seg.float() - y.float()).abs().max())}
        row["merged_over_segmented"] = row["merged_ms"] / row["segmented_ms"]
        rows_out[str(m)] = row
    wins = [m for m in sizes if rows_out[str(m)]["merged_over_segmented"] < 1.0]
    return {"n": n, "k": k, "rank": r, "adapters": adapters, "dtype": str(DTYPE), "backend": _lora_backend(),
            "token_rows_per_segment": rows_out, "smallest_winning_rows": min(wins) if wins else None}


def _lora_backend() -> str:
    from engine import ops

    x = torch.empty(1, 1, device=DEVICE, dtype=DTYPE)
    return ops.chosen("lora_segmented", x, x, None, x, x, x, x, x)


PARTS = {"sdpa": part_sdpa, "checkpointing": part_checkpointing, "lora_merge": part_lora_merge}


def main(argv: list[str] | None = None) -> int:
    """Run the parts named by --parts, rewriting --out after each; exit 1 if any part failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args(argv)
    result: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                    "commit": os.environ.get("FLOWOPD_COMMIT", ""), "parts": {}}
    failed = 0
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result["parts"][name] = PARTS[name]()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                                     "trace": traceback.format_exc()[-2000:]}
            failed += 1
        result["parts"][name]["seconds"] = time.perf_counter() - t0
        print(f"[probe] {name}: {json.dumps(result['parts'][name])[:600]}", flush=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
        if CUDA:
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
