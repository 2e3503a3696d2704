"""The editing world's model: the `zimage-tiny` transformer, its prompt encoder, conditioning of examples, the
flow-matching loss over T2I and edit rows, the expert adapters and the shipped weights.

Shipped under `engine/worlds/toy_edit/weights/` by `scripts/train_toy_edit_world.py`:
  base/               diffusers `ZImageTransformer2DModel` dir (config.json + safetensors + SHA256SUMS)
  experts/<task>/     per capability: PEFT dir (adapter_config.json + adapter_model.safetensors) and the diffusers
                      Z-Image LoRA file pytorch_lora_weights.safetensors, + SHA256SUMS
  eval.json           the recorded rows (tests reproduce them)
The prompt encoder is the backend's builtin `HashPromptEncoder` (no weights: a seeded table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.backends.zimage.cond import ZImageCond
from engine.backends.zimage.encoders import HashPromptEncoder
from engine.backends.zimage.forward import zimage_velocity
from engine.backends.zimage.presets import LORA_TARGETS, PRESETS
from engine.worlds.toy_edit.world import CHANNELS, IMAGE_SIZE, TASKS, Example

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PRESET = "zimage-tiny"
TRANSFORMER = PRESETS[PRESET].transformer
LATENT_SHAPE = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
MAX_TOKENS = 16  # "<bos>" + at most 11 words
EXPERTS: dict[str, str] = {task: task for task in TASKS}
"""Expert adapter name per task (the task tag routes a prompt to its expert)."""
PEFT_WEIGHTS, PEFT_CONFIG, DIFFUSERS_WEIGHTS = "adapter_model.safetensors", "adapter_config.json", \
    "pytorch_lora_weights.safetensors"


def new_encoder() -> HashPromptEncoder:
    """The world's prompt encoder: the backend's hash encoder at the tiny preset's caption width."""
    return HashPromptEncoder(int(TRANSFORMER["cap_feat_dim"]), LATENT_SHAPE, MAX_TOKENS)


def new_transformer(seed: int) -> torch.nn.Module:
    """A randomly initialised `zimage-tiny` transformer (deterministic in `seed`)."""
    from diffusers import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ZImageTransformer2DModel(**TRANSFORMER)


def conditioning(encoder: HashPromptEncoder, prompts: Sequence[str],
                 sources: Sequence[np.ndarray | torch.Tensor | None]) -> ZImageCond:
    """Rows for `prompts` (T2I rows where the source is None, edit rows with their clean source latent), in order.
    A dropped prompt ("") of an edit row keeps its source: the CFG-uncond row of DanceOPD / ZImageOmniPipeline."""
    if len(prompts) != len(sources):
        raise ValueError(f"{len(prompts)} prompts for {len(sources)} sources")
    rows = []
    for p, s in zip(prompts, sources):
        if s is None:
            rows.append(encoder.encode([p]))
        else:  # "" gives the Omni layout of the empty prompt: what uncond_twin builds
            rows.append(encoder.encode_edit([p]).with_source(torch.as_tensor(np.asarray(s), dtype=torch.float32)[None]))
    return ZImageCond.cat(rows)


def example_batch(encoder: HashPromptEncoder, examples: Sequence[Example],
                  drop: Sequence[bool] | None = None) -> tuple[torch.Tensor, ZImageCond]:
    """(targets [B, 3, 16, 16], conditioning) of examples; `drop[i]` replaces prompt i by "" (CFG dropout)."""
    drop = drop or [False] * len(examples)
    prompts = ["" if d else ex.prompt for ex, d in zip(examples, drop)]
    cond = conditioning(encoder, prompts, [ex.source for ex in examples])
    return torch.from_numpy(np.stack([ex.target for ex in examples])), cond


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """[n] training noise levels sigmoid(N(mean, std)) (SD3's logit-normal sampling)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, cond: ZImageCond,
                       generator: torch.Generator) -> torch.Tensor:
    """Rectified flow on the target only (the source stays clean): x = (1 - s) x0 + s eps, target v = eps - x0."""
    sigma = logit_normal_sigmas(x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    v = zimage_velocity(model, (1 - s) * x0 + s * eps, sigma, cond)
    return torch.nn.functional.mse_loss(v.float(), eps - x0)


# ------------------------------------------------------------------------------------------------ adapters


def add_expert(model: torch.nn.Module, name: str, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """A fresh LoRA `name` on DanceOPD's Z-Image targets, active and the only trainable thing; returns its params."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS),
                                 init_lora_weights="gaussian"), adapter_name=name)
    activate(model, name)
    params = []
    for pname, p in model.named_parameters():
        train = f".{name}." in pname and "lora_" in pname
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def activate(model: torch.nn.Module, name: str | None) -> None:
    """Make adapter `name` the active one (None: the base, adapters disabled). Leaves requires_grad alone."""
    if not getattr(model, "peft_config", None):
        if name is not None:
            raise KeyError(f"no adapter {name!r} on the model")
        return
    if name is None:
        model.disable_adapters()
        return
    model.enable_adapters()
    model.set_adapter(name)


def export_expert(model: torch.nn.Module, name: str, out_dir: Path) -> None:
    """PEFT dir + diffusers Z-Image LoRA file of adapter `name`, with SHA256SUMS."""
    import json

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from engine.backends.zimage.backend import ZImageBackend
    from engine.files import write_sha256sums

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    cfg = model.peft_config[name].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()} | {"inference_mode": True}
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(out_dir / PEFT_WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    ZImageBackend().save_lora(out_dir, state, cfg, DIFFUSERS_WEIGHTS)
    write_sha256sums(out_dir)


def load_world(weights_dir: str | Path = WEIGHTS_DIR, experts: bool = True) -> tuple[torch.nn.Module,
                                                                                   HashPromptEncoder]:
    """The shipped base (frozen, eval mode) with the experts loaded under `EXPERTS` names (diffusers' Z-Image LoRA
    files, checked against SHA256SUMS), and the prompt encoder."""
    from engine.backends.zimage.backend import ZImageBackend
    from engine.files import verify_sha256sums

    weights_dir = Path(weights_dir)
    model, _ = ZImageBackend().load(weights_dir / "base", torch.float32, latent_size=IMAGE_SIZE)
    model.eval()
    if experts:
        for task, name in EXPERTS.items():
            d = weights_dir / "experts" / task
            if bad := verify_sha256sums(d):
                raise ValueError("; ".join(bad))
            model.load_lora_adapter(str(d), weight_name=DIFFUSERS_WEIGHTS, adapter_name=name)
        activate(model, None)
    model.requires_grad_(False)
    return model, new_encoder()
