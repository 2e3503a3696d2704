"""Multi-teacher field evaluation: all fields in one segmented multi-LoRA forward vs one forward per field.

    pytest bench/test_multi_teacher.py --benchmark-enable -s                          (table on stdout)
    pytest bench/test_multi_teacher.py --benchmark-enable --benchmark-json=bench/results/multi_teacher_h100.json

Workload (issue 5): K = 1, 2, 4, 8 teachers, each a CFG field (g = 4.5: a conditional and an unconditional
row), plus the anchor (base, adapters off): 2K+1 forward rows per query latent, Q query latents per field.
On CUDA: the `sd35-medium` architecture (random init, bf16) at 512 px (1024 image + 333 text tokens), Q = 4
(FLOWOPD_BENCH_Q), teachers rank 32 / alpha 64 on the 8 attention projections (Flow-OPD's recipe). On CPU: the
`tiny` preset in float32, Q = 2, a smoke test of this file: `batched-triton` runs the kernels in the Triton
interpreter there, at K <= 2 only (`triton_interpreted` in extra_info; its times say nothing about a GPU).

Providers, each returning every field's velocity for the same rows:
- `base`: the same (2K+1)Q rows through the base alone (adapters off): the floor the LoRA overhead is measured
  against (issue goal: batched <= 1.10x base on H100);
- `batched-triton` / `batched-torch`: `BatchedFieldEvaluator`, one forward, segmented kernel / gather-bmm;
- `peft-loop`: `PeftFieldEvaluator`, peft's adapter switching, one forward per field (goal: batched >= 1.5x at K=4);
- `merged-segments`: `batched-triton` with `merge_rows = 1`: every frozen adapter's segment as one GEMM against
  W + s B A (the merged-weight path of engine/adapters/multi_lora.py; its crossover per projection is what
  bench/gpu_probe.py's `lora_merge` sweep measures);
- `merged`: per field, merge the adapter into the base weights, forward, unmerge (the Flow-OPD layout without
  K+2 weight copies).
Reported per run (extra_info, and a line on stdout): images/s (forward rows / s), field velocities / s,
TFLOP/s of useful work (FlopCounterMode on the base + LoRA, identical for every provider), peak memory, the
ratios of the issue's goals against the providers run before it for the same K (`time_vs_base`: goal <= 1.10;
`speedup_vs_peft_loop`: goal >= 1.5 at K = 4), and the weights resident after the run (distinct storages of the
parameters and the multi-LoRA stacks, any device) against base + adapters (goal: one base + K adapters; the
world holds 8 teachers for every K).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.adapters.lora import AdapterSwitch, LoraSpec, freeze_for_training, lora_layers, random_adapter
from engine.backends.sd3.backend import predict_velocity
from engine.backends.sd3.cond import SD3Cond
from engine.backends.sd3.presets import PRESETS
from engine.fields import Field, PeftFieldEvaluator
from engine.fields.batched import BatchedFieldEvaluator
from kernels.lora_segmented import triton_available

CUDA = torch.cuda.is_available()
K_VALUES = (1, 2, 4, 8)
# references first: ratios
PROVIDERS = ("base", "peft-loop", "batched-triton", "batched-torch", "merged-segments", "merged")
CFG = 4.5
ROUNDS = int(os.environ.get("FLOWOPD_BENCH_ROUNDS", "5" if CUDA else "3"))
_MEDIANS: dict[tuple[int, str], float] = {}


def _q() -> int:
    return int(os.environ.get("FLOWOPD_BENCH_Q", "4" if CUDA else "2"))


class World:
    """One model with K_max teachers, query inputs, and the per-row FLOP counts."""

    def __init__(self) -> None:
        self.device = torch.device("cuda" if CUDA else "cpu")
        self.dtype = torch.bfloat16 if CUDA else torch.float32
        self.preset = PRESETS["sd35-medium" if CUDA else "tiny"]
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        with self.device:
            model = SD3Transformer2DModel(**self.preset.transformer)
        self.model = model.to(self.dtype).eval()
        rank, alpha = (32, 64) if CUDA else (4, 8)
        for k in range(max(K_VALUES)):
            random_adapter(self.model, f"t{k}", LoraSpec(rank=rank, alpha=alpha), seed=100 + k)
        self.model.to(self.device, self.dtype)
        freeze_for_training(self.model, None)
        self.switch = AdapterSwitch(self.model)
        self.rank = rank
        q, p = _q(), self.preset
        gen = torch.Generator(device=self.device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=self.device).to(self.dtype)

        self.x = randn(q, p.latent_channels, p.latent_size, p.latent_size)
        self.sigma = torch.rand(q, generator=gen, device=self.device)
        self.cond = SD3Cond(randn(q, p.text_seq_len, p.joint_attention_dim), randn(q, p.pooled_projection_dim))
        self.uncond = SD3Cond(randn(1, p.text_seq_len, p.joint_attention_dim), randn(1, p.pooled_projection_dim))
        self.flops_base = self._flops(None)
        self.flops_lora = self._flops("t0") - self.flops_base
        sizes = [("lora_" in n, t.numel() * t.element_size()) for n, t in self.model.named_parameters()]
        self.weight_bytes = sum(size for is_lora, size in sizes if not is_lora)
        self.adapter_bytes = sum(size for is_lora, size in sizes if is_lora)

    @torch.no_grad()
    def _flops(self, adapter: str | None) -> int:
        """FLOPs of one row's forward (matmuls + attention) with `adapter` active."""
        counter = FlopCounterMode(display=False)
        with self.switch.use(adapter), counter:
            predict_velocity(self.model, self.x[:1], self.sigma[:1], self.cond[:1])
        return counter.get_total_flops()

    def fields(self, k: int) -> list[Field]:
        return [*(Field(f"t{i}", f"t{i}", CFG) for i in range(k)), Field("anchor", None)]

    def query(self, k: int) -> tuple[torch.Tensor, torch.Tensor, SD3Cond, list[str]]:
        """Every field on the same Q latents: (K+1)Q query rows, (2K+1)Q forward rows."""
        n = k + 1
        q = self.x.shape[0]
        rows = [name for f in self.fields(k) for name in [f.name] * q]
        cond = SD3Cond(self.cond.prompt_embeds.repeat(n, 1, 1), self.cond.pooled.repeat(n, 1))
        return self.x.repeat(n, 1, 1, 1), self.sigma.repeat(n), cond, rows


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _provider(world: World, k: int, name: str) -> Callable[[], torch.Tensor]:
    x, sigma, cond, rows = world.query(k)
    fields = world.fields(k)
    if name.startswith("batched") or name == "merged-segments":
        merge = 1 if name == "merged-segments" else 0  # every frozen segment against W + s B A (lora_merge_rows)
        ev = BatchedFieldEvaluator(world.model, predict_velocity, fields, world.uncond, merge_rows=merge)
        return lambda: ev.velocities(x, sigma, cond, rows)
    if name == "peft-loop":
        ref = PeftFieldEvaluator(world.model, predict_velocity, fields, world.uncond)
        return lambda: ref.velocities(x, sigma, cond, rows)
    if name == "base":
        q = world.x.shape[0]
        xb = torch.cat([x, x[: k * q]])
        sb = torch.cat([sigma, sigma[: k * q]])
        cb = SD3Cond.cat([cond, world.uncond.expand(k * q)])

        def base() -> torch.Tensor:
            with world.switch.use(None):
                return predict_velocity(world.model, xb, sb, cb)

        return base
    if name == "merged":
        q = world.x.shape[0]
        both = SD3Cond.cat([world.uncond.expand(q), world.cond])
        x2, s2 = torch.cat([world.x, world.x]), torch.cat([world.sigma, world.sigma])
        layers = lora_layers(world.model)

        def merged() -> torch.Tensor:
            out = []
            for f in fields:
                if f.adapter is None:
                    with world.switch.use(None):
                        out.append(predict_velocity(world.model, world.x, world.sigma, world.cond))
                    continue
                with world.switch.use(f.adapter):
                    for layer in layers:
                        layer.merge(adapter_names=[f.adapter])
                    v = predict_velocity(world.model, x2, s2, both)
                    for layer in layers:
                        layer.unmerge()
                out.append(v[:q] + f.cfg_scale * (v[q:] - v[:q]))
            return torch.cat(out)

        return merged
    raise ValueError(name)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and its multi-LoRA stacks (views count once)."""
    tensors = list(model.parameters())
    state = getattr(model, "_flowopd_multi_lora", None)
    for layer in state.layers if state is not None else ():
        stack = layer._mlora_stack
        if stack is not None:
            tensors += [stack.a, stack.b, stack.scales]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "commit": commit}  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("k", K_VALUES)
def test_multi_teacher(benchmark, world: World, k: int, provider: str, monkeypatch) -> None:
    if provider in ("batched-triton", "merged-segments"):
        if not triton_available():
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        if not CUDA and k > 2:  # the same code path at every K; interpreted, K = 8 costs ~20 s per forward
            pytest.skip("Triton interpreter: smoke test at K <= 2 only")
        monkeypatch.setenv("FLOWOPD_BACKEND_LORA_SEGMENTED", "triton")
    if provider == "batched-torch":
        monkeypatch.setenv("FLOWOPD_BACKEND_LORA_SEGMENTED", "torch")
    fn = _provider(world, k, provider)
    times: list[float] = []

    def run() -> torch.Tensor:
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    run()  # warm-up (Triton compile, cuBLAS heuristics) outside the statistics
    times.clear()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    assert torch.isfinite(out).all()
    q = world.x.shape[0]
    rows, fields = (2 * k + 1) * q, (k + 1) * q
    flops = rows * world.flops_base + (0 if provider == "base" else 2 * k * q * world.flops_lora)
    sec = statistics.median(times)
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": str(world.dtype).replace("torch.", ""),
        "preset": world.preset.name,
        "k": k,
        "query_latents": q,
        "forward_rows": rows,
        "tokens_per_row": world.preset.text_seq_len + (world.preset.latent_size // 2) ** 2,
        "lora_rank": world.rank,
        "seconds": sec,
        "images_per_s": rows / sec,
        "fields_per_s": fields / sec,
        "tflops": flops / sec / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
        "base_weights_gib": world.weight_bytes / 2**30,
        "adapters_gib": world.adapter_bytes / 2**30,
        "resident_weights_gib": resident_bytes(world.model) / 2**30,
        "resident_over_base_plus_adapters": resident_bytes(world.model) / (world.weight_bytes + world.adapter_bytes),
        "triton_interpreted": provider in ("batched-triton", "merged-segments") and not CUDA,
        **_versions(),
    }
    _MEDIANS[(k, provider)] = sec
    if provider != "base" and (k, "base") in _MEDIANS:
        info["time_vs_base"] = sec / _MEDIANS[(k, "base")]
    if provider not in ("base", "peft-loop") and (k, "peft-loop") in _MEDIANS:
        info["speedup_vs_peft_loop"] = _MEDIANS[(k, "peft-loop")] / sec
    benchmark.extra_info.update(info)
    mem = f"{info['peak_mem_gib']:.1f} GiB" if CUDA else "-"
    ratios = "".join(f"  {name} {info[name]:.2f}" for name in ("time_vs_base", "speedup_vs_peft_loop") if name in info)
    print(
        f"\n[multi_teacher] {info['device']} {info['preset']} {info['dtype']} K={k} rows={rows} {provider:>15}: "
        f"{sec * 1e3:9.2f} ms  {info['images_per_s']:9.1f} img/s  {info['tflops']:9.3g} TFLOP/s  peak {mem}{ratios}"
    )
