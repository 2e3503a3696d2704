"""LoRA-fused MMDiT joint attention: a drop-in for diffusers' `JointAttnProcessor2_0` + peft LoRA (DESIGN §3).

Per attention call, diffusers + peft run ~20 kernels per stream: three base GEMMs, for each of q/k/v/out a
LoRA shrink, expand, scale and add, an fp32-upcast RMSNorm on q and k (~6 kernels each), three `torch.cat`
copies, SDPA, a transpose copy, the split and the output projections. `FusedJointAttnProcessor` computes the
same function as:

1. one GEMM per stream for q|k|v against the concatenated frozen base weights (cached, rebuilt when a weight's
   data_ptr/_version changes) with every active LoRA folded into the weight first: W_eff[seg] = W[seg] +
   s B_seg A_seg per q/k/v segment, 3 x 2*1536*32*1536 = 0.45 GFLOP for SD3.5-M at r=32, against 232 GFLOP
   for the image QKV GEMM at 16 x 1024 tokens (75 GFLOP for the 16 x 333 text tokens). Its memory traffic
   (read W, write W_eff: 2 x 14 MB, ~10 us at 3 TB/s) is the main extra cost over a plain QKV GEMM;
2. the per-head QK RMSNorm as one Triton kernel per stream that reads the projection once and writes q, k,
   v straight into the joint [B, S_img + S_txt, H, D] buffers (`kernels/qk_rmsnorm.py`);
3. attention through a backend switch (engine/backends/sd3/sdpa.py): PyTorch SDPA with torch's or our kernel
   order (`auto`: cuDNN first on Hopper), one SDPA kernel, flash-attn or xformers when importable;
4. the output projections through the same LoRA-folded linear (one GEMM each).

Which adapters are active follows peft's per-layer state at call time (`_active_adapter`,
`_disable_adapters`, `scaling`), so `engine.adapters.lora.AdapterSwitch` works unchanged. Anything outside the
fast path (attention masks, LoRA dropout in training mode, DoRA and other variants, lora_bias, merged
adapters, autocast, base or norm weights in another dtype than the activations, norms other than RMSNorm)
falls back to diffusers' processor, logged once per reason, so results are always those of diffusers + peft.
LoRA parameters may be in another dtype than the base (fp32 LoRA on a bf16 base, as diffusers' training
scripts keep them); their grads come back in their own dtype.

Engine entry points: `install_attention(model)` (this processor, or diffusers' with the env override
`FLOWOPD_BACKEND_JOINT_ATTENTION=torch`), or directly `install_fused_attention(model, backend="sdpa")` /
`uninstall_fused_attention(model)`. The QK RMSNorm runs through op `qk_rmsnorm` of engine.ops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.normalization import RMSNorm
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from engine import ops
from engine.backends.sd3.sdpa import ATTENTION_BACKENDS, SDPA_CHOICES, attention_bshd, sdpa_context, warn_once

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------- LoRA-folded linear


@dataclass(frozen=True)
class LinearPlan:
    """How the LoRA tensors passed to `LoraLinearFunction` map onto the output rows of the weight."""

    segments: tuple[tuple[int, int], ...]
    """Output row ranges [r0, r1) of the (concatenated) weight, e.g. q, k, v; they partition the rows."""
    terms: tuple[tuple[int, float], ...]
    """Per LoRA term (A_t, B_t) in argument order: (segment index, scale alpha/r)."""
    lora_grad: bool
    """Whether any LoRA tensor needs a gradient (decides whether x and U = x A^T are saved)."""


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _merged_weight(weight: torch.Tensor, plan: LinearPlan, lora: Sequence[torch.Tensor], dtype: torch.dtype):
    """W_eff = W + s_t B_t A_t per segment, one rounding per term (addmm accumulates in fp32)."""
    if not plan.terms:
        return _as(weight, dtype)
    out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    written: set[int] = set()
    for t, (seg, scale) in enumerate(plan.terms):
        r0, r1 = plan.segments[seg]
        a, b = _as(lora[2 * t], dtype), _as(lora[2 * t + 1], dtype)
        if seg in written:
            out[r0:r1].addmm_(b, a, alpha=scale)
        else:
            torch.addmm(_as(weight[r0:r1], dtype), b, a, alpha=scale, out=out[r0:r1])
            written.add(seg)
    for seg, (r0, r1) in enumerate(plan.segments):
        if seg not in written:
            out[r0:r1].copy_(weight[r0:r1])
    return out


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + sum_t s_t (x A_t^T) B_t^T restricted to the rows of segment(t), as ONE GEMM x W_eff^T.

    Forward: W_eff = W + sum_t s_t B_t A_t (rows of segment t), y = x W_eff^T + b; when LoRA grads are needed
    also U = x A_cat^T, A_cat = [A_0; A_1; ...] (one shrink GEMM, N x R).
    Backward, with G = dL/dy and G_t its columns of segment t:
      dL/dx   = G W_eff                                   (recomputed W_eff: one plain-size GEMM, as without LoRA)
      dL/dU_t = s_t G_t B_t                               (N x r_t)
      dL/dB_t = s_t G_t^T U_t                             (D_t x r_t)
      dL/dA   = [dU_0, dU_1, ...]^T x, split by rank      (one GEMM for all terms)
      dL/dW = G^T x, dL/db = sum_rows G only when the base requires grad (frozen in OPD: never computed).
    Saved: x and U (N x R, 3 MB at 16 x 1024 tokens and R = 96), the same as peft's x and per-projection
    A x; W_eff is recomputed rather than kept (14 MB per stream and layer).
    """

    @staticmethod
    def forward(ctx: Any, plan: LinearPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                *lora: torch.Tensor) -> torch.Tensor:
        """y = x W_eff^T + b with the LoRA terms folded into W_eff (see the class docstring)."""
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w = _merged_weight(weight, plan, lora, dtype)
        y = torch.addmm(_as(bias, dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        u = None
        if plan.lora_grad:
            u = x2 @ torch.cat([_as(lora[2 * t], dtype) for t in range(len(plan.terms))]).t()
        keep_x = plan.lora_grad or weight.requires_grad
        ctx.save_for_backward(x2 if keep_x else None, u, weight, *lora)
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """dx, and dA/dB of every trainable LoRA term (the derivation in the class docstring)."""
        plan: LinearPlan = ctx.plan
        x2, u, weight, *lora = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dtype = dy2.dtype
        dx = dw = db = None
        if needs[1]:
            dx = (dy2 @ _merged_weight(weight, plan, lora, dtype)).view(ctx.x_shape)
        if needs[2]:
            dw = _as(dy2.t() @ _as(x2, dtype), weight.dtype)
        if ctx.has_bias and needs[3]:
            db = dy2.sum(0)
        dlora: list[torch.Tensor | None] = [None] * len(lora)
        if any(needs[4:]):
            dus, ranks, col = [], [], 0
            for t, (seg, scale) in enumerate(plan.terms):
                r0, r1 = plan.segments[seg]
                a, b = lora[2 * t], lora[2 * t + 1]
                g = dy2[:, r0:r1]
                dus.append(g @ _as(b, dtype) * scale)
                rank = a.shape[0]
                if needs[4 + 2 * t + 1]:
                    dlora[2 * t + 1] = ((g.t() @ u[:, col : col + rank]) * scale).to(b.dtype)
                ranks.append(rank)
                col += rank
            if any(needs[4 + 2 * t] for t in range(len(plan.terms))):
                da = (torch.cat(dus, 1).t() @ x2).split(ranks)
                for t in range(len(plan.terms)):
                    if needs[4 + 2 * t]:
                        dlora[2 * t] = da[t].to(lora[2 * t].dtype)
        return (None, dx, dw, db, *dlora)


# ------------------------------------------------------------------------------------- peft state


def _base_linear(mod: torch.nn.Module) -> torch.nn.Module:
    return mod.get_base_layer() if isinstance(mod, BaseTunerLayer) else mod


def lora_terms(mod: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]] | str:
    """The (A, B, scale) of every adapter peft's forward would apply now, or why the fast path cannot."""
    if not isinstance(mod, BaseTunerLayer):
        return [] if isinstance(mod, torch.nn.Linear) else f"{type(mod).__name__} projection"
    if not isinstance(mod, LoraLinear) or not isinstance(mod.get_base_layer(), torch.nn.Linear):
        return f"{type(mod).__name__} tuner layer"
    if mod.merged:
        return "merged LoRA adapters"
    if mod.disable_adapters:
        return []
    terms = []
    for name in mod.active_adapters:
        if name not in mod.lora_A:
            continue
        if name in getattr(mod, "lora_variant", {}):
            return f"LoRA variant (DoRA etc.) in adapter {name!r}"
        dropout = mod.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
            return f"LoRA dropout {dropout.p} in training mode (adapter {name!r})"
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
            return f"LoRA dropout module {type(dropout).__name__}"
        lora_b = mod.lora_B[name]
        if getattr(lora_b, "bias", None) is not None:
            return f"lora_bias in adapter {name!r}"
        terms.append((mod.lora_A[name].weight, lora_b.weight, float(mod.scaling[name])))
    return terms


_CACHE_ATTR = "_flowopd_weight_cache"


def _key(tensors: Sequence[torch.Tensor | None]) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)


@torch.compiler.disable
def _cached_cat(attn: Attention, slot: str, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    """Concatenated frozen base weight and bias, rebuilt when any source's data_ptr/_version/shape changes.

    In-place writes through `.data` do not bump `_version`: call `invalidate_fused_attention_cache` after those.
    """
    cache = attn.__dict__.setdefault(_CACHE_ATTR, {})
    key = _key([*weights, *biases])
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        w = torch.cat(weights)
        b = None
        if any(x is not None for x in biases):
            b = torch.cat([x if x is not None else w.new_zeros(wt.shape[0]) for x, wt in zip(biases, weights)])
    cache[slot] = (key, w, b)
    return w, b


def _project(attn: Attention, slot: str, bases: Sequence[torch.nn.Module], terms: list, x: torch.Tensor):
    """x @ [W_q; W_k; W_v]^T + b with every active LoRA folded in (or one base Linear for the out projections)."""
    weights, biases = [m.weight for m in bases], [m.bias for m in bases]
    if len(bases) == 1:
        weight, bias = weights[0], biases[0]
    elif torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (*weights, *biases)):
        weight = torch.cat(weights)  # a trainable base: let autograd reach the parameters through the cat
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
    else:
        weight, bias = _cached_cat(attn, slot, weights, biases)
    segments, row = [], 0
    for w in weights:
        segments.append((row, row + w.shape[0]))
        row += w.shape[0]
    flat, plan_terms = [], []
    for seg, seg_terms in enumerate(terms):
        for a, b, scale in seg_terms:
            flat += [a, b]
            plan_terms.append((seg, scale))
    lora_grad = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    plan = LinearPlan(tuple(segments), tuple(plan_terms), lora_grad)
    return LoraLinearFunction.apply(plan, x, weight, bias, *flat)


def project_qkv(attn: Attention, x: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """The fused q|k|v projection [B, S, 3*inner] of stream 0 (image: to_q/k/v) or 1 (text: add_*_proj)."""
    mods = [getattr(attn, name) for name in _STREAMS[stream]]
    terms = []
    for m in mods:
        t = lora_terms(m)
        if isinstance(t, str):
            raise ValueError(f"no fused projection for {t}")
        terms.append(t)
    return _project(attn, f"qkv{stream}", [_base_linear(m) for m in mods], terms, x)


# ------------------------------------------------------------------------------------- the processor

_STREAMS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
_NORMS = (("norm_q", "norm_k"), ("norm_added_q", "norm_added_k"))


@dataclass
class _CallPlan:
    terms: list[list[list]]
    """Per stream, per projection (q, k, v): active LoRA terms (A, B, scale)."""
    bases: list[list[torch.nn.Linear]]
    """Per stream, the frozen base Linear of q, k, v."""
    out_terms: list[list]
    """LoRA terms of to_out.0 and (if present) to_add_out."""
    out_bases: list[torch.nn.Linear]
    norm_flags: list[tuple[bool, bool]]
    norm_weights: list[tuple[torch.Tensor | None, torch.Tensor | None]]
    eps: float


def _check_norm(norm: torch.nn.Module | None, dtype: torch.dtype) -> str | None:
    if norm is None:
        return None
    if type(norm) is not RMSNorm:
        return f"qk norm {type(norm).__name__} (only diffusers RMSNorm is fused)"
    if norm.bias is not None:
        return "RMSNorm with bias"
    if norm.weight is not None and norm.weight.dtype != dtype:
        return f"RMSNorm weight dtype {norm.weight.dtype} != activations {dtype}"
    return None


def _plan_call(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, attention_mask
) -> _CallPlan | str:
    """Everything the fused path needs from peft/diffusers state, or the reason to use the reference."""
    if attention_mask is not None:
        return "attention_mask"
    if hidden_states.ndim != 3:
        return f"{hidden_states.ndim}-d hidden states"
    if torch.is_autocast_enabled(hidden_states.device.type):
        return "autocast"
    dtype = hidden_states.dtype
    streams = 1 if encoder_hidden_states is None else 2
    if streams == 2 and (encoder_hidden_states.dtype != dtype or encoder_hidden_states.ndim != 3):
        return "encoder hidden states of another dtype/rank"
    terms, all_bases, flags, weights, eps = [], [], [], [], set()
    for s in range(streams):
        mods = [getattr(attn, name, None) for name in _STREAMS[s]]
        if any(m is None for m in mods):
            return f"missing projection in {_STREAMS[s]}"
        if any(getattr(getattr(m, "_mlora", None), "batch", None) is not None for m in mods):
            # a segmented multi-LoRA forward gives each row its own adapter: the projections must run per row
            return "segmented multi-LoRA batch (per-row adapters)"
        bases = [_base_linear(m) for m in mods]
        if len({b.out_features for b in bases}) != 1:
            return "q, k, v of different widths"
        stream_terms = []
        for m, base in zip(mods, bases):
            t = lora_terms(m)
            if isinstance(t, str):
                return t
            if base.weight.dtype != dtype:
                return f"projection weight dtype {base.weight.dtype} != activations {dtype}"
            stream_terms.append(t)
        terms.append(stream_terms)
        all_bases.append(bases)
        norms = [getattr(attn, name, None) for name in _NORMS[s]]
        for norm in norms:
            reason = _check_norm(norm, dtype)
            if reason is not None:
                return reason
            if norm is not None:
                eps.add(float(norm.eps))
        flags.append((norms[0] is not None, norms[1] is not None))
        weights.append(tuple(n.weight if n is not None else None for n in norms))
    if len(eps) > 1:
        return f"different RMSNorm eps {sorted(eps)}"
    out_mods = [attn.to_out[0]]
    if streams == 2 and not attn.context_pre_only:
        out_mods.append(attn.to_add_out)
    out_terms, out_bases = [], []
    for m in out_mods:
        t = lora_terms(m)
        if isinstance(t, str):
            return t
        base = _base_linear(m)
        if base.weight.dtype != dtype:
            return "output projection dtype differs from activations"
        out_terms.append(t)
        out_bases.append(base)
    return _CallPlan(terms, all_bases, out_terms, out_bases, flags, weights, eps.pop() if eps else 1e-6)


class FusedJointAttnProcessor:
    """`JointAttnProcessor2_0` + peft LoRA, fused (see the module docstring); one instance may serve all blocks."""

    def __init__(self, backend: str = "sdpa"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: {ATTENTION_BACKENDS}")
        self.backend = backend
        self.reference = JointAttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One joint-attention call (diffusers' processor signature)."""
        plan = _plan_call(attn, hidden_states, encoder_hidden_states, attention_mask)
        if isinstance(plan, str):
            warn_once(f"{plan}: using diffusers' JointAttnProcessor2_0")
            with sdpa_context(self.backend if self.backend in SDPA_CHOICES else "sdpa", hidden_states):
                return self.reference(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, s_img = hidden_states.shape[:2]
        inputs = [hidden_states] if encoder_hidden_states is None else [hidden_states, encoder_hidden_states]
        ys = [_project(attn, f"qkv{s}", plan.bases[s], plan.terms[s], x) for s, x in enumerate(inputs)]
        inner = ys[0].shape[-1] // 3
        q, k, v = ops.qk_rmsnorm(
            ys,
            [w[0] for w in plan.norm_weights],
            [w[1] for w in plan.norm_weights],
            [f[0] for f in plan.norm_flags],
            [f[1] for f in plan.norm_flags],
            attn.heads,
            plan.eps,
        )
        o = attention_bshd(q, k, v, self.backend).reshape(batch, -1, inner)
        img = _project(attn, "out", plan.out_bases[:1], plan.out_terms[:1], o[:, :s_img])
        img = attn.to_out[1](img)
        if encoder_hidden_states is None:
            return img
        txt = o[:, s_img:]
        if not attn.context_pre_only:
            txt = _project(attn, "add_out", plan.out_bases[1:], plan.out_terms[1:], txt)
        return img, txt


class KernelChoiceProcessor(JointAttnProcessor2_0):
    """diffusers' `JointAttnProcessor2_0` (the reference) with its SDPA call restricted to the kernels of an SDPA
    backend (`auto`, `sdpa-cudnn`, ...): the same function, another attention kernel."""

    def __init__(self, backend: str):
        super().__init__()
        if backend not in SDPA_CHOICES:
            raise ValueError(f"the reference processor runs SDPA only: backend {backend!r}; valid: {SDPA_CHOICES}")
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> Any:
        """diffusers' processor call under `sdpa_context(backend)`."""
        with sdpa_context(self.backend, hidden_states):
            return super().__call__(attn, hidden_states, *args, **kwargs)


# ------------------------------------------------------------------------------------- install

_PROCESSORS = (JointAttnProcessor2_0, KernelChoiceProcessor, FusedJointAttnProcessor)


def _joint_attention_modules(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention) and type(m.processor) in _PROCESSORS]


def install_fused_attention(model: torch.nn.Module, backend: str = "sdpa") -> int:
    """Put `FusedJointAttnProcessor(backend)` on every joint/dual attention of `model`; returns how many."""
    proc = FusedJointAttnProcessor(backend)
    mods = _joint_attention_modules(model)
    for m in mods:
        m.set_processor(proc)
    return len(mods)


def uninstall_fused_attention(model: torch.nn.Module) -> int:
    """Restore diffusers' `JointAttnProcessor2_0` and drop the weight caches; returns how many modules."""
    mods = _joint_attention_modules(model)
    for m in mods:
        m.set_processor(JointAttnProcessor2_0())
        m.__dict__.pop(_CACHE_ATTR, None)
    return len(mods)


def invalidate_fused_attention_cache(model: torch.nn.Module) -> None:
    """Forget concatenated base weights (needed only after in-place writes through `.data`)."""
    for m in model.modules():
        m.__dict__.pop(_CACHE_ATTR, None)


def install_reference(model: torch.nn.Module, backend: str = "sdpa") -> int:
    """diffusers' processor on every joint attention; with an SDPA backend other than `sdpa` (auto, sdpa-cudnn, ...)
    its SDPA call runs under that kernel choice (`KernelChoiceProcessor`). Returns how many modules."""
    n = uninstall_fused_attention(model)
    if backend in SDPA_CHOICES and backend != "sdpa":
        proc = KernelChoiceProcessor(backend)
        for m in _joint_attention_modules(model):
            m.set_processor(proc)
    elif backend != "sdpa":
        warn_once(f"the reference processor runs SDPA only (asked for {backend!r}): using sdpa")
    return n


def install_attention(model: torch.nn.Module, backend: str = "sdpa") -> int:
    """Install the fused processor (`model.attention = "fused"`), or diffusers' reference processor when the
    environment asks for it: FLOWOPD_BACKEND_JOINT_ATTENTION=torch (or FLOWOPD_BACKEND=torch). The choice is not a
    kernel op of engine.ops (the fused processor runs on every device), only its documented switch is shared."""
    if ops.env_request("joint_attention") == "torch":
        return install_reference(model, backend)
    return install_fused_attention(model, backend)
