"""Model FLOPs of one `ZImageTransformer2DModel` forward row, counted per part the way the network runs.

Counted (multiply-add = 2; norms, activations, RoPE, softmax and other elementwise work are not, as in
engine/flops.py for SD3): every linear on the tokens that pass through it, and QK^T + PV of each block's attention
over its sequence. Z-Image pads every segment (each caption segment, each image, the SigLIP grid) to a multiple
of SEQ_MULTI_OF = 32 tokens and the padding tokens are computed like real ones, so the counts use padded lengths.
Paths (transformer_z_image.py `forward`): x_embedder + `n_refiner_layers` noise-refiner blocks on the image tokens
(source and target in Omni mode), cap_embedder + context-refiner blocks on the caption tokens, siglip_embedder +
siglip-refiner blocks on the SigLIP tokens, `n_layers` main blocks on the unified sequence, and the final layer on
the whole unified sequence. A block is 4 D x D attention projections + SwiGLU (w1, w3: D -> F, w2: F -> D,
F = int(D / 3 * 8)). Conditioning (per row, not per token): the timestep MLP (256 -> 1024 -> min(D, 256)) and the
adaLN linears of the modulated blocks and of the final layer, twice in Omni mode (noisy and clean).

Approximation: one row alone; in a batch of rows with different caption lengths diffusers pads every row to the
longest and those tokens are computed too (not counted here). The test checks the count against
torch.utils.flop_counter on the tiny preset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SEQ_MULTI_OF = 32
ADALN_EMBED_DIM = 256
T_MID = 1024
T_FREQ = 256
BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def _pad(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def _block(tokens: int, dim: int, ffn: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one block over `tokens`."""
    linear = 2.0 * tokens * (4 * dim * dim + 3 * dim * ffn)
    return linear, 2 * 2.0 * tokens * tokens * dim


def _block_lora(tokens: int, dim: int, ffn: int, rank: int, targets: Sequence[str]) -> float:
    shapes = {"to_q": (dim, dim), "to_k": (dim, dim), "to_v": (dim, dim), "to_out.0": (dim, dim),
              "w1": (dim, ffn), "w3": (dim, ffn), "w2": (ffn, dim)}
    return sum(2.0 * tokens * (shapes[t][0] * rank + rank * shapes[t][1]) for t in targets if t in shapes)


def forward_flop_parts(config: Mapping, latent_hw: tuple[int, int], caption_tokens: Sequence[int],
                       edit: bool = False, siglip_tokens: int = 0, lora_rank: int | None = None,
                       lora_targets: Sequence[str] = ()) -> dict[str, float]:
    """FLOPs by part of one row: `latent_hw` the target latent (h, w), `caption_tokens` the real tokens of each
    caption segment (1 for T2I, 3 for an edit), `edit` = a clean source of the target's size before the target,
    `siglip_tokens` its SigLIP grid size (0 = none)."""
    dim = int(config["dim"])
    ffn = int(dim / 3 * 8)
    patch = int(config["all_patch_size"][0])
    c_in = int(config["in_channels"]) * patch * patch
    refiners, layers = int(config["n_refiner_layers"]), int(config["n_layers"])
    unknown = sorted(set(lora_targets) - set(BLOCK_LINEARS))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not counted (only the block linears {BLOCK_LINEARS} are)")
    img = _pad((latent_hw[0] // patch) * (latent_hw[1] // patch)) * (2 if edit else 1)
    cap = sum(_pad(n) for n in caption_tokens)
    sig = _pad(siglip_tokens) if (edit and siglip_tokens) else 0
    unified = img + cap + sig
    out = dict(image=0.0, text=0.0, siglip=0.0, unified=0.0, attention=0.0, conditioning=0.0, lora=0.0)
    out["image"] += 2.0 * img * c_in * dim
    out["text"] += 2.0 * cap * int(config["cap_feat_dim"]) * dim
    if sig:
        out["siglip"] += 2.0 * sig * int(config["siglip_feat_dim"]) * dim
    for key, tokens, count in (("image", img, refiners), ("text", cap, refiners), ("siglip", sig, refiners),
                               ("unified", unified, layers)):
        if tokens == 0:
            continue
        lin, att = _block(tokens, dim, ffn)
        out[key] += count * lin
        out["attention"] += count * att
        if lora_rank:
            out["lora"] += count * _block_lora(tokens, dim, ffn, lora_rank, lora_targets)
    out["unified"] += 2.0 * unified * dim * c_in  # final layer (on the whole unified sequence)
    emb = min(dim, ADALN_EMBED_DIM)
    branches = 2 if edit else 1
    out["conditioning"] = branches * (2.0 * (T_FREQ * T_MID + T_MID * emb) + (refiners + layers) * 2.0 * emb * 4 * dim
                                      + 2.0 * emb * dim)
    out["total"] = sum(out.values())
    return out
