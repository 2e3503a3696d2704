"""One full OPD iteration (Trainer.train_step): the fast path vs the reference path.

    pytest bench/test_iteration.py -s                                                    (table on stdout)
    pytest bench/test_iteration.py --benchmark-json=bench/results/<date>-<device>-iteration.json
    pytest bench/test_iteration.py -k fast ...; pytest bench/test_iteration.py -k reference ...   (bench/gpu_suite.sh)

Workload (issue 7), one micro-batch on one rank: rollout B = 16 images (2 prompts x 8) x 10 SDE steps with CFG
4.5, K = 2 routed teachers (random rank-r stand-ins) with CFG 4.5, the base as MAR anchor (CFG 4.5, beta 0.04),
2 query states per image, the student (LoRA r, alpha 2r, CFG 4.5 in the loss) forward + backward, the DeepSpeed
ZeRO-2 AdamW step. On CUDA: the `sd35-medium` architecture (random init, bf16) at 512 px (64x64 latent, 1024
image + 333 text tokens), r = 32, gradient checkpointing on (as configs/sd35m_flow_opd.toml; bench/gpu_probe.py
measures it off). On CPU: the `tiny` preset, float32, r = 4, same row counts; FLOWOPD_BENCH_SMOKE=1 shrinks that to
B = 2 x 3 steps (the suite's --dry-run).

Paths (both the real Trainer, differing only in config):
- `reference`: diffusers' attention processor + peft, one forward per field (teachers one after another),
  unfused SDE chain (kernels.default = torch: every op its PyTorch reference), eager rollout, torch's SDPA kernel order;
- `fast`: LoRA-fused joint attention with `attention_backend = auto` (cuDNN first on Hopper), all fields in one
  segmented multi-LoRA forward, fused SDE/ODE step kernels, rollout steps replayed as CUDA graphs
  (kernels.cuda_graphs; eager fallback on CPU). Not in it until measured: `kernels.lora_merge_rows`,
  `model.compile`. On CPU the QK-norm of the fused attention runs its torch path (FLOWOPD_BACKEND_QK_RMSNORM=torch):
  Triton there is an interpreter.

Measured per path: WARMUP steps (FLOWOPD_BENCH_WARMUP), then ROUNDS timed steps (FLOWOPD_BENCH_ROUNDS) as a run
makes them (`train.phase_timing` off: no sync at phase ends), then one step with phase timing on (the GPU seconds
per phase) and one under the host-sync census (engine/host_syncs.py on real devices: every would-be copy, read and
synchronising call by file:line; FLOWOPD_BENCH_CENSUS=0 skips it). Each step prints its time as it ends. Reported
(extra_info, and a line on stdout): s/iteration (median of the rounds), images/s, model TFLOP/s and MFU with FLOPs
per DESIGN §3 (engine/flops.py: per modality, model FLOPs, no recomputation; identical for both paths), seconds and
TFLOP/s per phase (the phase-timed step), the rounds' host-side phase seconds, the rollout's host issue time as a
fraction of its wall time (fast path), the host-sync census, the speed-up over the reference when both ran in one
session (else bench/gpu_suite.sh computes it from the two JSONs), peak memory. Peak for MFU: FLOWOPD_PEAK_TFLOPS,
else 790 (dense bf16 GEMM measured on the H200, DESIGN §3) on H100/H200, else the GEMM rate measured in this run.
Issue goals (bf16): fast >= 2.5x reference, >= 50% MFU, rollout host overhead < 5% of GPU time.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from engine.backends.sd3.flops import MMDiTDims, iteration_flops, opd_iteration_shape
from engine.config import Config, load_config
from engine.host_syncs import HostSyncCensus

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]
PRESET = "sd35-medium" if CUDA else "tiny"
RANK = 32 if CUDA else 4
SMOKE = os.environ.get("FLOWOPD_BENCH_SMOKE") == "1" and not CUDA
WARMUP = int(os.environ.get("FLOWOPD_BENCH_WARMUP", "2" if CUDA else "1"))  # graph capture, Triton JIT, cuBLAS
ROUNDS = int(os.environ.get("FLOWOPD_BENCH_ROUNDS", "3"))
CENSUS = os.environ.get("FLOWOPD_BENCH_CENSUS", "1") == "1"  # one extra step under the host-sync census
DESIGN_PEAK_TFLOPS = 790.0  # DESIGN §3: dense bf16 GEMM measured on the H200 (KINDS.md: 769-798)
RESULTS: dict[str, float] = {}  # path -> median s/iteration, for the speed-up line

PATHS = {
    "reference": ['model.attention="reference"', 'model.attention_backend="sdpa"', 'opd.evaluator="reference"',
                  'kernels.default="torch"', "kernels.cuda_graphs=false"],
    "fast": ['model.attention="fused"', 'model.attention_backend="auto"', 'opd.evaluator="batched"',
             'kernels.default="auto"', "kernels.cuda_graphs=true"],
}


def overrides(path: str) -> list[str]:
    """`--set` overrides of configs/tiny.toml giving the workload on `path` (bench/gpu_suite.sh profiles the same)."""
    steps, group = (3, 1) if SMOKE else (10, 8)
    workload = [
        f'model.preset="{PRESET}"', f'model.dtype="{"bfloat16" if CUDA else "float32"}"',
        f"model.gradient_checkpointing={'true' if CUDA else 'false'}", 'init.merge="none"',
        f"student.rank={RANK}", f"student.alpha={2.0 * RANK}", f"teachers.0.rank={RANK}", f"teachers.1.rank={RANK}",
        "fields.0.cfg_scale=4.5", "fields.1.cfg_scale=4.5", "fields.2.cfg_scale=4.5",
        'rollout.sampler="sde"', f"rollout.steps={steps}", "rollout.cfg_scale=4.5", f"rollout.group_size={group}",
        "train.prompts_per_step=2", "train.grad_accum=1", "train.steps=1000", "train.save_every=0",
        "train.phase_timing=false", "opd.query_states=2", "opd.student_cfg=4.5", 'opd.anchor="base"', "opd.beta=0.04",
    ]
    return workload + PATHS[path]


def _config(path: str, out: Path) -> Config:
    return load_config(REPO / "configs" / "tiny.toml", [*overrides(path), f'output_dir="{out}"'])


def _gemm_tflops() -> float:
    """Median rate of a large square GEMM in the run's dtype (bf16 8192^3 on CUDA, fp32 1024^3 on CPU)."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if CUDA else (256 if SMOKE else 1024, torch.float32, 5)
    dev = "cuda" if CUDA else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for i in range(reps + 3):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if CUDA:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


@pytest.fixture(scope="module")
def peak() -> dict[str, object]:
    measured = _gemm_tflops()
    if os.environ.get("FLOWOPD_PEAK_TFLOPS"):
        return {"peak_tflops": float(os.environ["FLOWOPD_PEAK_TFLOPS"]), "peak_source": "FLOWOPD_PEAK_TFLOPS",
                "gemm_tflops_measured": measured}
    name = torch.cuda.get_device_name() if CUDA else ""
    if any(h in name for h in ("H100", "H200")):
        return {"peak_tflops": DESIGN_PEAK_TFLOPS, "peak_source": "DESIGN §3 dense bf16 H100",
                "gemm_tflops_measured": measured}
    return {"peak_tflops": measured, "peak_source": "GEMM measured in this run", "gemm_tflops_measured": measured}


def _free_port() -> str:
    """A port nobody listens on: the trainer's default (29500 + pid % 2000) can collide on a shared machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("path", list(PATHS))
def test_iteration(benchmark, path: str, peak: dict[str, object], tmp_path: Path, monkeypatch) -> None:
    from engine.trainer import Trainer

    if not CUDA:  # `auto` would run the fused attention's QK-norm kernel in Triton's CPU interpreter (an emulator)
        monkeypatch.setenv("FLOWOPD_BACKEND_QK_RMSNORM", "torch")
    config = _config(path, tmp_path / path)
    os.environ.setdefault("MASTER_PORT", _free_port())  # one process group for both paths
    _free()
    trainer = Trainer(config)
    try:
        step = iter(range(10**6))

        def progress(kind: str, row: dict) -> dict:  # one line per step: a step cut short by SIGINT keeps these
            print(f"\n[iteration] {path} {kind} step {row['step']}: {row['step_s']:.3f} s", flush=True)
            return row

        for _ in range(WARMUP):
            progress("warm-up", trainer.train_step(next(step)))
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runner = getattr(trainer.rollout, "runner", None)  # GraphRollout's RolloutRunner (kernels.cuda_graphs)
        issued = runner.issue_seconds if runner is not None else 0.0
        rows: list[dict] = []
        measured_steps: list[int] = []

        def iteration() -> None:
            s = next(step)
            measured_steps.append(s)
            rows.append(progress("timed", trainer.train_step(s)))

        benchmark.pedantic(iteration, rounds=ROUNDS, iterations=1)
        issued = (runner.issue_seconds - issued) if runner is not None else None
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
        trainer.timer.sync = CUDA  # one step with the GPU synchronised at each phase end: GPU seconds per phase
        timed = progress("phase-timed", trainer.train_step(next(step)))
        trainer.timer.sync = False
        census = HostSyncCensus(REPO, simulate=not CUDA)
        if CENSUS:
            with census:
                if not CUDA:  # host memory on a GPU run: the prompt table, the data order's permutations
                    census.mark_host(*trainer.embeddings.table.tensors().values(),
                                     *trainer.sampler._perm_cache.values())
                progress("census", trainer.train_step(next(step)))
        flops = _flops(trainer, config, measured_steps)
        mode = runner.last_mode if runner is not None else "eager (reference rollout)"
    finally:
        trainer.close()
        trainer = None  # free the model before the next path builds its own
        _free()

    assert all(r["loss"] == r["loss"] and not r["skipped"] for r in rows)  # finite, applied
    sec = benchmark.stats.stats.median
    RESULTS[path] = sec
    images = config.train.prompts_per_step * config.rollout.group_size * config.train.grad_accum
    total = sum(f["total"] for f in flops.values())
    phases = {k[len("time/"):]: v for k, v in timed.items() if k.startswith("time/")}
    host_phases = {k[len("time/"):]: statistics.mean(r[k] for r in rows) for k in rows[0] if k.startswith("time/")}
    info: dict[str, object] = {
        "path": path, "preset": PRESET, "dtype": "bfloat16" if CUDA else "float32",
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "images": images,
        "rollout_steps": config.rollout.steps, "query_states": config.opd.query_states, "teachers": 2,
        "lora_rank": RANK, "s_per_iteration": sec, "images_per_s": images / sec,
        "model_tflop_per_iteration": total / 1e12, "tflops": total / sec / 1e12,
        "mfu": total / sec / 1e12 / float(peak["peak_tflops"]), **peak,
        "phase_seconds": phases, "phase_seconds_synchronised": CUDA, "phase_host_seconds": host_phases,
        "phase_timed_step_s": timed["step_s"],
        "phase_tflop": {k: v["total"] / 1e12 for k, v in flops.items()},
        "phase_tflops": {k: flops[k]["total"] / phases[k] / 1e12 for k in flops if phases.get(k)},
        "flops_by_modality": {m: sum(f[m] for f in flops.values()) / 1e12
                              for m in ("image", "text", "attention", "conditioning", "lora")},
        "rollout_mode": mode, "peak_mem_gib": peak_mem, "warmup_steps": WARMUP,
        "host_syncs_censused": CENSUS,
        "host_syncs": {f"{kind} {site}": n for (kind, site), n in census.by_site().items()},
        "host_syncs_total": {k: census.count(k) for k in ("h2d", "d2h", "sync")},
        "host_syncs_engine": {k: census.count(k, "engine/") + census.count(k, "kernels/")
                              for k in ("h2d", "d2h", "sync")},
    }
    if issued is not None and phases.get("rollout"):  # issue time over the rounds vs the synchronised rollout time
        info["rollout_host_fraction"] = issued / (phases["rollout"] * len(rows))
    if path == "fast" and "reference" in RESULTS:
        info["speedup_vs_reference"] = RESULTS["reference"] / sec
    benchmark.extra_info.update(info)
    speed = f"  {info['speedup_vs_reference']:.2f}x ref" if "speedup_vs_reference" in info else ""
    print(f"\n[iteration] {info['device']} {PRESET} {path:>9}: {sec:8.3f} s/it  {images / sec:7.2f} img/s  "
          f"{info['tflops']:8.3g} TFLOP/s  MFU {info['mfu']:.1%}{speed}  "
          + "  ".join(f"{k} {v:.3g}s" for k, v in phases.items()))


def _flops(trainer, config: Config, steps: list[int]) -> dict[str, dict[str, float]]:
    """Mean model FLOPs per phase over the measured steps (routes decide which fields run)."""
    dims = MMDiTDims.from_config(trainer.spec.config)
    ranks = {f.name: None if f.adapter is None else trainer.model.peft_config[f.adapter].r
             for f in trainer.fields.values()}
    text_tokens = trainer.uncond.prompt_embeds.shape[1]
    out: dict[str, dict[str, float]] = {}
    for s in steps:
        draw = trainer.router.draw(s)
        routes = trainer.router.route(s, trainer.sampler.batch(s, 0, draw.pool, draw.key, draw.pool_step).tasks)
        shape = opd_iteration_shape(config, ranks, routes)
        for phase, count in iteration_flops(dims, trainer.spec.latent_shape[-1], text_tokens, shape).items():
            name = {"student_forward": "student/forward", "student_backward": "student/backward"}.get(phase, phase)
            acc = out.setdefault(name, {})
            for k, v in count.as_dict().items():
                acc[k] = acc.get(k, 0.0) + v * config.train.grad_accum / len(steps)
    return out
