"""CUDA-graph rollouts (DESIGN §3): one denoising step captured once, replayed for every step and every batch.

The captured step is the whole per-step work of a rollout: the student's forward with its LoRA (conditional and,
with CFG, unconditional rows in one batch) and the fused SDE/ODE step with CFG folded in and the noise drawn
in-kernel (Philox, `sde_step_indexed`). Everything it reads or writes lives in static buffers of a cache entry:

    x [B,C,H,W] fp32 ─► model(cat[x, x], sigmas[step], cond2) ─► sde_step_indexed(out=x, seed=seeds, offset=step)
                                                                 ├► states[step + 1] = x, log_probs[step] = lp
                                                                 └► step += 1            (all on the device)

The step counter lives on the device and the graph increments it, so the loop is T `graph.replay()` calls and
nothing else: no host syncs, no copies, no Python between steps. A rollout copies its inputs into the entry
(initial latent, prompt embeddings, per-row Philox keys, sigmas; pinned non-blocking copies), replays T times and
clones the trajectory out. Entries are cached by everything a capture bakes in (shapes, dtypes, device, steps,
sampler, noise level, guidance, adapter): batches of the same shape reuse one graph; all graphs share one
memory pool, which is safe because no tensor allocated inside a capture outlives it.

Eager fallback: the same `_step` on the same static buffers without capture, so both modes run the same ops and
draw the same noise (graph == eager up to GEMM algorithm choice; the step kernel itself replays bit for bit).
It is used on CPU, when graphs are off, and when a capture fails (one log line per cause, e.g. a forward that
reads a value on the host or ZeRO-3's parameter gathering hooks).

A captured graph reads parameters through their storage, so in-place optimizer updates (DeepSpeed ZeRO-1/2
keeps the flat buffers for the whole run) are seen by later replays; a parameter whose storage moved
(`param.data = ...`, re-sharding) makes the entry re-capture (checked per rollout by data_ptr, ~0.3 ms at
SD3.5-M's ~1100 tensors). The adapter is activated only around the capture: the LoRA that runs is the one that
was active then (peft's `scaling` included).

Noise: `PhiloxNoise` (rollout.py): `SampleNoise`'s initial latent; step noise keyed by (derive_seed(seed, NOISE,
sample id), offset step), a pure function of (seed, sample id, step), so resuming and splitting a batch over
ranks give the same trajectories as with the reference `SampleNoise` stream, though not the same numbers:
switching `kernels.cuda_graphs` in a run changes the SDE noise (an ODE rollout is the same in both).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.adapters.lora import AdapterSwitch
from engine.backends.base import TensorCond
from engine.fields.evaluator import Velocity
from engine.fields.field import Field
from engine.fields.rows import RowPlan, plan_rows, take
from engine.ops import ode_step_indexed, sde_step_indexed
from engine.profiling import nvtx_range
from engine.sampling.rollout import PhiloxNoise, Trajectory

log = logging.getLogger("flowopd")

WARMUP_STEPS = 2  # eager steps on a side stream before capture: cuBLAS handles/workspaces, Triton JIT, weight caches
MAX_ENTRIES = 8  # distinct (shape, config) graphs kept; a trainer uses one


@dataclass(frozen=True)
class GraphKey:
    """Everything a capture bakes in; a rollout with another value needs another graph."""

    latent: tuple[int, ...]
    """(B, C, H, W) of the trajectory."""
    text: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    """(name, per-row shape, dtype) of every conditioning tensor."""
    model_dtype: torch.dtype
    device: str
    steps: int
    sampler: str
    noise_level: float
    guidance: float
    adapter: str | None


@dataclass
class _Entry:
    """Static buffers of one key, the graph replaying over them (None: eager), and the parameters it read."""

    x: torch.Tensor
    states: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    step: torch.Tensor
    seeds: torch.Tensor
    cond: TensorCond
    plan: RowPlan
    graph: torch.cuda.CUDAGraph | None = None
    params: tuple[int, ...] = ()
    failed: bool = False


class RolloutRunner:
    """The student's rollouts from static buffers, replayed as CUDA graphs where possible (see module doc).

    `field` is the rolled-out field (the student adapter and its rollout CFG scale); `uncond` the unconditional
    prompt (batch 1) used when `field.cfg_scale != 1` (each row's twin is `cond.uncond_twin(uncond)`, the row plan's
    layout); `velocity` the model family's v(model, x, sigma, cond); `switch` the model's `AdapterSwitch` (the field
    evaluator's, so both agree on the active adapter); `graphs=False` runs the same ops eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        field: Field,
        uncond: TensorCond,
        *,
        velocity: Velocity,
        sampler: str = "sde",
        noise_level: float = 0.7,
        graphs: bool = True,
        switch: AdapterSwitch | None = None,
    ):
        if sampler not in ("sde", "ode"):
            raise ValueError(f"sampler must be 'sde' or 'ode', got {sampler!r}")
        self.model = model
        self.velocity = velocity
        self.field = field
        self.uncond = uncond
        self.sampler = sampler
        self.noise_level = float(noise_level)
        self.graphs = graphs
        self.switch = switch if switch is not None else AdapterSwitch(model)
        self.entries: OrderedDict[GraphKey, _Entry] = OrderedDict()
        self._pool: tuple | None = None
        self._logged: set[str] = set()
        self.last_mode = ""
        """`graph` or `eager`: how the last rollout ran (for logs and tests)."""
        self.issue_seconds = 0.0
        """Host time spent issuing the step loops (no sync inside): the rollout's CPU cost, for the benchmark."""

    # ------------------------------------------------------------------------------------------ public

    @torch.no_grad()
    def rollout(self, cond: TensorCond, noise: PhiloxNoise, sigmas: torch.Tensor) -> Trajectory:
        """T = len(sigmas) - 1 steps from `noise.initial()`; the same Trajectory as `rollout()` with `noise`."""
        if not isinstance(noise, PhiloxNoise):
            raise TypeError(f"RolloutRunner draws step noise in-kernel: give a PhiloxNoise, not {type(noise).__name__}")
        device = noise.device
        x0 = noise.initial()
        b = x0.shape[0]
        if len(cond) != b:
            raise ValueError(f"{len(cond)} prompt embeddings for {b} latents")
        dtype = next(self.model.parameters()).dtype
        text = tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in cond.tensors().items())
        key = GraphKey(tuple(x0.shape), text, dtype, str(device), sigmas.shape[0] - 1, self.sampler, self.noise_level,
                       float(self.field.cfg_scale), self.field.adapter)
        entry = self._entry(key, dtype, device, cond)
        inputs = (x0, cond, self._device_ints(noise.row_seeds(), device), sigmas)
        self._load(entry, *inputs)
        if self._want_graph(key, entry):
            self._capture(key, entry)
            self._load(entry, *inputs)  # warm-up steps moved x, step and the outputs
        start = time.perf_counter()
        with nvtx_range("rollout:graph" if entry.graph is not None else "rollout:eager", "green"):
            if entry.graph is not None:
                self.last_mode = "graph"
                for _ in range(key.steps):
                    entry.graph.replay()
            else:
                self.last_mode = "eager"
                with self.switch.use(self.field.adapter):
                    for _ in range(key.steps):
                        self._step(entry, key)
        self.issue_seconds += time.perf_counter() - start
        return Trajectory(states=entry.states.clone(), log_probs=entry.log_probs.clone(), sigmas=entry.sigmas.clone())

    # ------------------------------------------------------------------------------------------ steps

    def _step(self, e: _Entry, key: GraphKey) -> None:
        """One denoising step on the entry's buffers; everything stays on the device (capturable)."""
        b = key.latent[0]
        guided = key.guidance != 1.0
        sigma = e.sigmas.index_select(0, e.step).expand(len(e.plan))
        v = self.velocity(self.model, take(e.x, e.plan.src), sigma, e.cond)
        v_u, v_c = e.plan.split(v, range(b))
        v_plain = None if guided else v_c
        v_c = v_c if guided else None
        if key.sampler == "sde":
            r = sde_step_indexed(e.x, v_plain, e.sigmas, e.step, key.noise_level, v_uncond=v_u, v_cond=v_c,
                                 guidance=key.guidance, seed=e.seeds, offset=e.step, return_mean=False, out=e.x)
            e.log_probs.index_copy_(0, e.step, r.log_prob.unsqueeze(0))
        else:
            ode_step_indexed(e.x, v_plain, e.sigmas, e.step, v_uncond=v_u, v_cond=v_c, guidance=key.guidance, out=e.x)
        e.states.index_copy_(0, e.step + 1, e.x.unsqueeze(0))
        e.step.add_(1)

    # ------------------------------------------------------------------------------------------ buffers

    def _entry(self, key: GraphKey, dtype: torch.dtype, device: torch.device, like: TensorCond) -> _Entry:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            if entry.graph is not None and entry.params != self._param_ptrs():
                self._once("moved", "rollout graph: parameter storage moved since capture; re-capturing")
                entry.graph = None
            return entry
        b, t = key.latent[0], key.steps
        plan = plan_rows([self.field] * b)  # [uncond; cond] when guided, as every field evaluator lays them out
        entry = _Entry(
            x=torch.zeros(key.latent, dtype=torch.float32, device=device),
            states=torch.zeros((t + 1, *key.latent), dtype=torch.float32, device=device),
            log_probs=torch.zeros(t, b, dtype=torch.float32, device=device),
            sigmas=torch.zeros(t + 1, dtype=torch.float32, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            seeds=torch.zeros(b, dtype=torch.int64, device=device),
            cond=like.zeros(len(plan), dtype=dtype, device=device),
            plan=plan,
        )
        self.entries[key] = entry
        while len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)
        return entry

    def _load(self, e: _Entry, x0: torch.Tensor, cond: TensorCond, seeds: torch.Tensor, sigmas: torch.Tensor) -> None:
        e.x.copy_(x0)
        e.states[0].copy_(x0)
        e.cond.copy_(e.plan.conds(cond, self.uncond))
        e.seeds.copy_(seeds, non_blocking=True)
        e.sigmas.copy_(sigmas)
        e.step.zero_()

    @staticmethod
    def _device_ints(values: list[int], device: torch.device) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if device.type == "cuda":
            t = t.pin_memory()  # a pageable host->device copy would block the host until the stream gets there
        return t.to(device, non_blocking=True)

    def _param_ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    # ------------------------------------------------------------------------------------------ capture

    def _want_graph(self, key: GraphKey, entry: _Entry) -> bool:
        if entry.graph is not None or entry.failed or not self.graphs:
            return False
        if not self._can_capture(key):
            self._once("device", f"kernels.cuda_graphs: rollouts on {key.device} run eagerly (CUDA graphs need a "
                                 f"CUDA device; same ops, same noise)")
            return False
        return True

    @staticmethod
    def _can_capture(key: GraphKey) -> bool:
        return key.device.startswith("cuda") and torch.cuda.is_available()

    def _capture(self, key: GraphKey, entry: _Entry) -> None:
        try:
            with nvtx_range("rollout:capture", "yellow"), self.switch.use(self.field.adapter):
                self._record(key, entry)
        except Exception as exc:  # any op that cannot be captured: run this key eagerly from now on
            entry.graph, entry.failed = None, True
            self._once(f"capture:{type(exc).__name__}",
                       f"kernels.cuda_graphs: capturing the rollout step failed ({type(exc).__name__}: {exc}); "
                       f"rollouts of shape {key.latent} run eagerly (same ops, same noise)")

    def _record(self, key: GraphKey, entry: _Entry) -> None:
        device = torch.device(key.device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(entry, key)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(entry, key)
        entry.graph, entry.params = graph, self._param_ptrs()
        log.info("rollout step captured as a CUDA graph for %s", key)

    def _once(self, cause: str, message: str) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning(message)


class GraphRollout:
    """The `Rollout` interface over a `RolloutRunner`: in-kernel Philox step noise keyed by (seed, sample id, step).

    A rollout with an SDE window (some steps ODE) runs through `mixed`, the eager runner: the captured step has one
    sampler baked in (one log line says so)."""

    def __init__(self, runner: RolloutRunner, *, seed: int, latent_shape: tuple[int, ...], device: torch.device,
                 mixed: Callable[..., Trajectory] | None = None):
        self.runner, self.seed, self.latent_shape, self.device = runner, seed, tuple(latent_shape), device
        self.mixed = mixed

    def __call__(self, cond: TensorCond, sample_ids: Sequence[int], sigmas: torch.Tensor,
                 sde_steps: Sequence[int] | None = None) -> Trajectory:
        """The rollout of `sample_ids` from static buffers (CUDA graphs where possible)."""
        if sde_steps is not None:
            if self.mixed is None:
                raise ValueError("an SDE-window rollout needs the eager runner (GraphRollout(mixed=...))")
            self.runner._once("window", "kernels.cuda_graphs: SDE-window rollouts run eagerly (one captured step "
                                        "has one sampler)")
            return self.mixed(cond, sample_ids, sigmas, sde_steps)
        return self.runner.rollout(cond, PhiloxNoise(self.seed, sample_ids, self.latent_shape, self.device), sigmas)
