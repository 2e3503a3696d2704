"""Model FLOPs of the SD3 MMDiT and of one OPD iteration, counted per modality (DESIGN §3), for TFLOP/s and MFU.

Counted the way the network runs, not as 2 x params x tokens: image tokens go through the image-stream weights
(patch embedding, to_q/k/v/out, ff, the dual-attention attn2 of SD3.5, proj_out), text tokens through the text
stream (context_embedder, add_q/k/v_proj, to_add_out, ff_context; the last block is context-pre-only: no text
output projection or text MLP), attention couples both (QK^T and PV over N_img + N_txt tokens), and the
timestep/pooled embedders and adaLN modulations run once per image. A multiply-add is 2 FLOPs; softmax, norms,
activations and other elementwise work are not counted (as in torch.utils.flop_counter, which the tests compare
against). SD3.5-M at 512 px (1024 image + 333 text tokens): 2.44 TFLOP per image forward.

Backward of the student (frozen base, trainable LoRA on the attention projections) counts model FLOPs: the input
gradient of every token linear downstream of the first adapter (block 0's q/k/v projections read inputs no
trainable parameter touched, so they get none), the attention core twice (dQ, dK from dS; dV, dP from dO), LoRA
dA and dB; no weight gradients of the base, no conditioning path (it never depends on a trainable parameter), and
no recomputation (gradient checkpointing's re-run forward and SDPA's recomputed scores are overhead, not model
FLOPs; `attention_recompute` is reported beside it). That makes fwd + bwd ~2.1x the forward at 512 px.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config.schema import Config

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_QKV = {"image": ("to_q", "to_k", "to_v"), "text": ("add_q_proj", "add_k_proj", "add_v_proj")}
_OUT = {"image": "to_out.0", "text": "to_add_out"}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by where they run; add and scale like numbers (`a + b`, `3 * a`)."""

    image: float = 0.0
    """Linears on image tokens (image-stream weights, incl. patch embedding and proj_out)."""
    text: float = 0.0
    """Linears on text tokens (text-stream weights, incl. context_embedder)."""
    attention: float = 0.0
    """QK^T and PV of the joint attention (and of SD3.5's image-only attn2)."""
    conditioning: float = 0.0
    """Timestep and pooled-text embedders, adaLN modulation linears (once per image, not per token)."""
    lora: float = 0.0
    """LoRA shrink/expand (and their gradients) of the active adapter, both streams."""

    @property
    def total(self) -> float:
        """All FLOPs."""
        return self.image + self.text + self.attention + self.conditioning + self.lora

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, k: float) -> FlopCount:
        return FlopCount(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        """The parts and the total by name."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


@dataclass(frozen=True)
class MMDiTDims:
    """The shape parameters of an `SD3Transformer2DModel` that its FLOPs depend on."""

    dim: int
    """Hidden size = heads x head_dim (1536 for SD3.5-M)."""
    layers: int
    dual_layers: tuple[int, ...]
    """Blocks with SD3.5's extra image-only attention (attn2)."""
    patch: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int
    """Width of the prompt embeddings (4096: T5-XXL / padded CLIP)."""
    pooled_dim: int
    caption_dim: int

    @classmethod
    def from_config(cls, cfg: Mapping) -> MMDiTDims:
        """From diffusers' `model.config` or a preset's `transformer` kwargs (diffusers' defaults where absent)."""
        dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        caption = int(cfg.get("caption_projection_dim", dim))
        if caption != dim:
            raise ValueError(f"caption_projection_dim {caption} != hidden size {dim}: not an SD3 layout")
        return cls(dim=dim, layers=int(cfg["num_layers"]), dual_layers=tuple(cfg.get("dual_attention_layers") or ()),
                   patch=int(cfg["patch_size"]), in_channels=int(cfg["in_channels"]),
                   out_channels=int(cfg.get("out_channels") or cfg["in_channels"]),
                   joint_attention_dim=int(cfg["joint_attention_dim"]),
                   pooled_dim=int(cfg["pooled_projection_dim"]), caption_dim=caption)

    def image_tokens(self, latent_size: int) -> int:
        """Image tokens of a latent of side `latent_size`."""
        return (latent_size // self.patch) ** 2


@dataclass(frozen=True)
class Lora:
    """An active adapter: rank and the module-name suffixes it wraps (peft matches attn2's projections too)."""

    rank: int
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(ATTENTION_PROJECTIONS))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not counted (only the attention projections "
                             f"{ATTENTION_PROJECTIONS} are)")
        if not set(self.targets) & {*_QKV["image"], *_QKV["text"]}:
            raise ValueError(f"LoRA targets {self.targets}: the backward count assumes a q/k/v projection is "
                             f"trained (gradients start at block 0's attention)")


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _blocks(d: MMDiTDims, latent_size: int, text_tokens: int):
    """Per block: (index, image tokens, text tokens, has attn2, context-pre-only)."""
    n_img = d.image_tokens(latent_size)
    for i in range(d.layers):
        yield i, n_img, text_tokens, i in d.dual_layers, i == d.layers - 1


def _attention_projections(d: MMDiTDims, latent_size: int, text_tokens: int) -> list[tuple[int, str, str, int]]:
    """Every attention projection that runs: (block, stream, name, tokens); attn2's are image-stream."""
    out = []
    for i, n_img, n_txt, dual, last in _blocks(d, latent_size, text_tokens):
        for stream, n in (("image", n_img), ("text", n_txt)):
            out += [(i, stream, name, n) for name in _QKV[stream]]
            if stream == "image" or not last:
                out.append((i, stream, _OUT[stream], n))
        if dual:
            out += [(i, "image", name, n_img) for name in (*_QKV["image"], _OUT["image"])]
    return out


def forward_flops(d: MMDiTDims, latent_size: int, text_tokens: int, lora: Lora | None = None) -> FlopCount:
    """One image's forward (one row of the batch), with `lora` active (None = the base / adapters disabled)."""
    n_img = d.image_tokens(latent_size)
    dim = d.dim
    image = _linear(n_img, d.in_channels * d.patch**2, dim) + _linear(n_img, dim, d.patch**2 * d.out_channels)
    text = _linear(text_tokens, d.joint_attention_dim, d.caption_dim)
    attention = 0.0
    cond = _linear(1, 256, dim) + _linear(1, dim, dim) + _linear(1, d.pooled_dim, dim) + _linear(1, dim, dim)
    cond += _linear(1, dim, 2 * dim)  # norm_out (AdaLayerNormContinuous)
    for _, n_i, n_t, dual, last in _blocks(d, latent_size, text_tokens):
        image += 4 * _linear(n_i, dim, dim) + 2 * _linear(n_i, dim, 4 * dim)  # q, k, v, out; MLP 4x
        text += 3 * _linear(n_t, dim, dim) + (0 if last else _linear(n_t, dim, dim) + 2 * _linear(n_t, dim, 4 * dim))
        n = n_i + n_t
        attention += 2 * 2.0 * n * n * dim  # QK^T and PV, summed over heads
        cond += _linear(1, dim, (9 if dual else 6) * dim)  # norm1: AdaLayerNormZero(X)
        cond += _linear(1, dim, (2 if last else 6) * dim)  # norm1_context
        if dual:
            image += 4 * _linear(n_i, dim, dim)
            attention += 2 * 2.0 * n_i * n_i * dim
    lora_flops = 0.0
    if lora is not None:
        for _, _, name, n in _attention_projections(d, latent_size, text_tokens):
            if name in lora.targets:
                lora_flops += _linear(n, dim, lora.rank) + _linear(n, lora.rank, dim)
    return FlopCount(image=image, text=text, attention=attention, conditioning=cond, lora=lora_flops)


def backward_flops(d: MMDiTDims, latent_size: int, text_tokens: int, lora: Lora) -> FlopCount:
    """Model FLOPs of the student's backward for one image (frozen base, `lora` trainable); see the module doc."""
    fwd = forward_flops(d, latent_size, text_tokens, None)
    n_img = d.image_tokens(latent_size)
    dim = d.dim
    # input grads: every token linear but the patch embedding, the context embedder and block 0's q/k/v
    image = fwd.image - _linear(n_img, d.in_channels * d.patch**2, dim)
    text = fwd.text - _linear(text_tokens, d.joint_attention_dim, d.caption_dim)
    lora_flops = 0.0
    for block, stream, name, n in _attention_projections(d, latent_size, text_tokens):
        first_qkv = block == 0 and name in _QKV[stream]
        if first_qkv:
            if stream == "image":
                image -= _linear(n, dim, dim)
            else:
                text -= _linear(n, dim, dim)
        if name in lora.targets:
            # dU = dY B and dB = dY^T U (expand side), dA = dU^T X, and dX += dU A unless X needs no grad
            lora_flops += 2 * _linear(n, lora.rank, dim) + (1 if first_qkv else 2) * _linear(n, dim, lora.rank)
    return FlopCount(image=image, text=text, attention=2 * fwd.attention, conditioning=0.0, lora=lora_flops)


def attention_recompute(d: MMDiTDims, latent_size: int, text_tokens: int) -> float:
    """QK^T re-run by memory-efficient SDPA backwards (flash, efficient, torch.utils.flop_counter's count)."""
    return forward_flops(d, latent_size, text_tokens).attention / 2


@dataclass(frozen=True)
class IterationShape:
    """How many transformer rows one OPD iteration (one micro-batch of one rank) runs, per phase."""

    rows: int
    """Images of the micro-batch (prompts x group size)."""
    steps: int
    """Rollout denoising steps."""
    rollout_guided: bool
    """Rollout with CFG: two forward rows per image and step."""
    chunks: int
    """Query states scored per image (dense: steps - 1)."""
    field_rows: Sequence[tuple[int | None, bool]]
    """Per chunk, one entry per target row: (teacher LoRA rank or None for the base, guided)."""
    student: Lora
    student_guided: bool


def iteration_flops(d: MMDiTDims, latent_size: int, text_tokens: int, it: IterationShape) -> dict[str, FlopCount]:
    """Model FLOPs per phase: rollout, fields (teachers + anchor), student_forward, student_backward."""
    targets = it.student.targets
    fwd_student = forward_flops(d, latent_size, text_tokens, it.student)
    roll_rows = it.rows * (2 if it.rollout_guided else 1)
    field_total = FlopCount()
    for rank, guided in it.field_rows:
        f = forward_flops(d, latent_size, text_tokens, None if rank is None else Lora(rank, targets))
        field_total = field_total + f * (2 if guided else 1)
    student_rows = it.rows * (2 if it.student_guided else 1)
    return {
        "rollout": fwd_student * (it.steps * roll_rows),
        "fields": field_total * it.chunks,
        "student_forward": fwd_student * (it.chunks * student_rows),
        "student_backward": backward_flops(d, latent_size, text_tokens, it.student) * (it.chunks * student_rows),
    }


def opd_iteration_shape(config: Config, field_ranks: Mapping[str, int | None], routes: Sequence[str]) -> IterationShape:
    """The rows of one micro-batch of `config` whose samples go to the fields `routes` (Router.route).

    `field_ranks`: LoRA rank of each field's source adapter, None for the base (adapters disabled).
    """
    c = config
    guided = {f.name: f.cfg_scale != 1.0 for f in c.fields}
    rows = [(field_ranks[name], guided[name]) for name in routes]
    if c.opd.anchor and c.opd.beta > 0:
        rows += [(field_ranks[c.opd.anchor], guided[c.opd.anchor])] * len(routes)
    return IterationShape(
        rows=len(routes), steps=c.rollout.steps, rollout_guided=c.rollout.cfg_scale != 1.0,
        chunks=c.opd.query_states or c.rollout.steps - 1, field_rows=tuple(rows),
        student=Lora(c.student.rank, tuple(c.student.targets)), student_guided=c.opd.student_cfg != 1.0,
    )
