"""v(x, sigma | cond) of a `ZImageTransformer2DModel` in the engine's convention, from a `ZImageCond` batch.

Conventions (engine: sigma 1 = noise, 0 = data, x_sigma = (1 - sigma) x_data + sigma eps, v = eps - x_data):
- timestep: Z-Image is conditioned on t = 1 - sigma (the model multiplies by `t_scale` = 1000 itself). Both
  pipelines compute it from the scheduler timestep T = 1000 sigma as `(1000 - T) / 1000` in float32
  (pipeline_z_image.py:510-511, pipeline_z_image_omni.py "timestep = (1000 - timestep) / 1000"; DanceOPD
  zimage_diffsynth.py:277 `scaled_timestep = (1000.0 - timestep) / 1000.0`); `model_timestep` does exactly that, so
  the embedding sees the same float32 value bit for bit.
- output: the model predicts x_data - eps (the direction of increasing t); both pipelines negate it before the
  scheduler's Euler step (`noise_pred = -noise_pred`, pipeline_z_image.py:568; DanceOPD zimage_diffsynth.py:286
  `return -output`), so the engine's velocity is `-model(...)`.
- classifier-free guidance: the pipelines' `pos + g (pos - neg)` is the engine's `v_u + a (v_c - v_u)` with
  a = g + 1 (negation commutes with the affine combination); CFG stays the caller's business here.

Rows. A text-to-image row runs diffusers' basic mode (`x = [latent]`, one caption), as ZImagePipeline does. An edit
row runs the Omni mode exactly as ZImageOmniPipeline builds it: `x = [source, target]`, `image_noise_mask = [0, 1]`
(the source is clean: its tokens get the t = 1 adaLN modulation), caption segments [s1, s2, s3], SigLIP features
`[siglip_source, None]` (or None for the row: DanceOPD's `siglip_feats=[None]`); diffusers returns only the target's
prediction. DanceOPD pins its edit call in tests/test_core.py:240-267 (noise mask [[0, 1]], SigLIP [None],
t = (1000 - 750) / 1000 = 0.25, output negated); its caption segments come from DiffSynth's `encode_prompt_omni`,
whose template is ZImageOmniPipeline's (encoders.omni_texts).
Rows of different kinds need different forward modes, so a mixed batch runs one forward per kind (in row order
inside each); a homogeneous batch (the common case: DanceOPD's hard routing puts one task in a step) is one call,
the same call the pipeline makes.
"""

from __future__ import annotations

import torch

from engine.backends.zimage.cond import ZImageCond


def model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Z-Image's `t` input for engine noise levels `sigma` (float32): (1000 - 1000 sigma) / 1000."""
    scheduler_t = sigma.to(torch.float32) * 1000.0
    return (1000.0 - scheduler_t) / 1000.0


def _row_inputs(x: torch.Tensor, cond: ZImageCond, i: int, dtype: torch.dtype) -> tuple:
    """(x entry, caption entry, siglip entry, noise mask) of row i in diffusers' list format."""
    target = x[i].to(dtype).unsqueeze(1)  # (C, F=1, H, W)
    segs = [s.to(dtype) for s in cond.segments(i)]
    n_src = int(cond.n_source[i])
    if n_src == 0:
        return target, segs[0], None, None
    if n_src != 1:
        raise ValueError(f"row {i}: n_source = {n_src}; only one source image per edit row is supported")
    source = cond.source[i].to(dtype).unsqueeze(1)
    h, w = (int(v) for v in cond.siglip_hw[i].tolist())
    sig = None if h * w == 0 else [cond.siglip[i, : h * w].to(dtype).reshape(h, w, -1), None]
    return [source, target], segs, sig, [0, 1]


def row_groups(cond: ZImageCond) -> dict[tuple[int, bool], list[int]]:
    """Row indices per forward kind: (n_source, has SigLIP) -> rows, in row order (`ZImageCond.kinds`)."""
    return cond.kinds()


def zimage_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor | float,
                    cond: ZImageCond) -> torch.Tensor:
    """Engine velocity [B, C, H, W] (model dtype) of `model` at `x` [B, C, H, W], noise level `sigma` ([B] or
    scalar), conditioning `cond`; whatever peft adapter is active on `model` is used."""
    b = x.shape[0]
    if len(cond) != b:
        raise ValueError(f"{len(cond)} conditioning rows for {b} latents")
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    t = model_timestep(sigma)
    dtype = next(model.parameters()).dtype
    out: list[torch.Tensor | None] = [None] * b
    for (n_src, has_siglip), rows in row_groups(cond).items():
        if has_siglip and getattr(model, "siglip_embedder", None) is None:
            raise ValueError("edit rows carry SigLIP features but this transformer has no SigLIP branch "
                             "(siglip_feat_dim is None): drop them (siglip_hw = 0) or load an Omni transformer")
        parts = [_row_inputs(x, cond, i, dtype) for i in rows]
        kwargs = {}
        if n_src > 0:
            kwargs = dict(siglip_feats=[p[2] for p in parts], image_noise_mask=[p[3] for p in parts])
        pred = model([p[0] for p in parts], t[rows], [p[1] for p in parts], return_dict=False, **kwargs)[0]
        for i, p in zip(rows, pred):
            out[i] = p
    return -torch.stack(out).squeeze(2)  # type: ignore[arg-type]
