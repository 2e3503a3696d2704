"""Export the student adapter as a PEFT adapter dir and as a diffusers LoRA file (DESIGN §5).

- `adapter_config.json` + `adapter_model.safetensors`: keys `base_model.model.<module>.lora_{A,B}.weight`,
  exactly what `PeftModel.save_pretrained` writes, with the true `lora_alpha`.
- `pytorch_lora_weights.safetensors`: the model family's own diffusers LoRA format (`ModelBackend.save_lora`; SD3:
  keys `transformer.<module>.lora_{A,B}.weight` with the adapter config as `lora_adapter_metadata`, written by
  diffusers' `save_lora_weights`, so `StableDiffusion3Pipeline.load_lora_weights` restores alpha).
- `SHA256SUMS` of those files (`sha256sum -c` format), checked when the adapter is loaded as a teacher.
Files are written into a temporary sibling dir and renamed into place, so a crash never leaves a
half-written export behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from engine.adapters.lora import DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, STUDENT
from engine.backends.base import ModelBackend
from engine.files import write_sha256sums


def adapter_state(model: torch.nn.Module, name: str = STUDENT) -> dict[str, torch.Tensor]:
    """Module-relative LoRA weights of adapter `name` (float32, contiguous, on CPU)."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def adapter_config_dict(model: torch.nn.Module, name: str = STUDENT) -> dict:
    """peft's config of adapter `name` as JSON-able values (sets sorted), marked for inference."""
    cfg = model.peft_config[name].to_dict()
    for key, value in list(cfg.items()):
        if isinstance(value, set):
            cfg[key] = sorted(value)
    cfg["inference_mode"] = True
    return cfg


def _default_modes(directory: Path) -> None:
    """The modes a plain mkdir/open would give (0777/0666 minus the umask): mkdtemp makes the dir 0700 and
    safetensors 0.8 writes 0600 files (measured), which would hide the export from others on a shared cluster."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~mask)


def export_adapter(model: torch.nn.Module, out_dir: str | Path, backend: ModelBackend, name: str = STUDENT) -> Path:
    """Write both formats of adapter `name` into `out_dir` atomically (the diffusers file in `backend`'s format);
    returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model, name)
    cfg = adapter_config_dict(model, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        backend.save_lora(tmp, state, cfg, DIFFUSERS_WEIGHTS)
        write_sha256sums(tmp)
        _default_modes(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
