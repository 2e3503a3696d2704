"""Export the student adapter as a PEFT adapter dir and as a diffusers LoRA file (DESIGN §5).

- `adapter_config.json` + `adapter_model.safetensors`: keys `base_model.model.<module>.lora_{A,B}.weight`,
  exactly what `PeftModel.save_pretrained` writes, with the true `lora_alpha`.
- `pytorch_lora_weights.safetensors`: the model family's own diffusers LoRA format (`ModelBackend.save_lora`; SD3:
  keys `transformer.<module>.lora_{A,B}.weight` with the adapter config as `lora_adapter_metadata`, written by
  diffusers' `save_lora_weights`, so `StableDiffusion3Pipeline.load_lora_weights` restores alpha).
- `SHA256SUMS` of those files (`sha256sum -c` format), checked when the adapter is loaded as a teacher.
Files are written into a temporary sibling dir and renamed into place, so a crash never leaves a
half-written export behind; what a kill leaves (the temp dir, the previous export moved aside) is cleaned up at the
next start (`clean_stale_exports`). Two exports of the same weights are byte-identical: safetensors writes its
`__metadata__` map in a per-process hash order (measured: the diffusers file's two keys swapped between processes),
so every file's header is rewritten in a canonical order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
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


def clean_stale_exports(out_dir: str | Path) -> list[Path]:
    """Remove what a killed `export_adapter` left beside `out_dir` (its `.<name>.*` temp dirs; `<name>.old`, put back
    when the kill fell between the two renames and `out_dir` is missing); returns the removed paths."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    old = out_dir.with_name(out_dir.name + ".old")
    if old.is_dir() and not out_dir.exists():
        os.replace(old, out_dir)
    stale = [p for p in out_dir.parent.iterdir() if p.is_dir() and (p.name.startswith(f".{out_dir.name}.") or p == old)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's header deterministically (metadata keys sorted, tensors in data order): the same
    tensors and metadata give the same bytes in every process."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered = dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    if meta is not None:
        ordered = {"__metadata__": dict(sorted(meta.items())), **ordered}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format's 8-byte alignment of the data section
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def export_adapter(model: torch.nn.Module, out_dir: str | Path, backend: ModelBackend, name: str = STUDENT) -> Path:
    """Write both formats of adapter `name` into `out_dir` atomically (the diffusers file in `backend`'s format);
    returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_exports(out_dir)
    state = adapter_state(model, name)
    cfg = adapter_config_dict(model, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        backend.save_lora(tmp, state, cfg, DIFFUSERS_WEIGHTS)
        for f in sorted(tmp.glob("*.safetensors")):
            canonical_safetensors(f)
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
