"""Student and teacher LoRA adapters on one frozen base, held by peft.

All adapters live in the same diffusers transformer as named peft adapters: the trainable `student`,
frozen teachers, and the anchor/base field (= adapters disabled). `AdapterSwitch` changes the active
adapter by setting peft's per-layer state directly: peft's own `set_adapter` also flips `requires_grad`
(it makes the active adapter trainable), which would un-freeze a teacher and freeze the student.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from engine.backends.sd3.backend import DEFAULT_TARGETS
from engine.errors import AdapterError

STUDENT = "student"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraSpec:
    """The shape and init of one LoRA adapter (what peft's LoraConfig gets)."""
    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """peft target module suffixes; default: SD3's 8 joint-attention projections (tests, scripts); the trainer
    always passes the resolved `student.targets`."""
    init: str = "gaussian"
    """peft `init_lora_weights`: 'gaussian' (A ~ N(0, 1/r), B = 0), 'default' (Kaiming A, B = 0), 'zeros'."""

    def to_peft(self) -> LoraConfig:
        """The peft LoraConfig of this spec."""
        init: bool | str = {"default": True, "zeros": False}.get(self.init, self.init)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            init_lora_weights=init,
        )


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    """Every peft LoRA layer of `model`."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def add_adapter(model: torch.nn.Module, name: str, spec: LoraSpec) -> None:
    """Inject a new named adapter (diffusers `add_adapter`), leaving trainability to `freeze_for_training`."""
    if name in getattr(model, "peft_config", {}):
        raise AdapterError(f"an adapter named {name!r} is already loaded")
    model.add_adapter(spec.to_peft(), adapter_name=name)


def freeze_for_training(model: torch.nn.Module, trainable: str | None = STUDENT) -> list[torch.nn.Parameter]:
    """requires_grad only on the `trainable` adapter's LoRA weights; returns them (the optimizer's params)."""
    params: list[torch.nn.Parameter] = []
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable is None:
        return params
    for layer in lora_layers(model):
        for mod_dict in (layer.lora_A, layer.lora_B):
            if trainable in mod_dict:
                for p in mod_dict[trainable].parameters():
                    p.requires_grad_(True)
                    params.append(p)
    return params


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on `model`, in load order."""
    return list(getattr(model, "peft_config", {}).keys())


_COMPANIONS = "_flowopd_companions"


def set_companions(model: torch.nn.Module, name: str, companions: Sequence[str]) -> None:
    """Frozen adapters that `AdapterSwitch` activates together with adapter `name` (and never alone): a warm start
    merged under the student (engine/student.py)."""
    setattr(model, _COMPANIONS, {**getattr(model, _COMPANIONS, {}), name: list(companions)})


def companions(model: torch.nn.Module, name: str | None) -> list[str]:
    """The companions of adapter `name` (`set_companions`); [] for None or none set."""
    return list(getattr(model, _COMPANIONS, {}).get(name, [])) if name is not None else []


def is_full_checkpoint(path: Path) -> bool:
    """True for a full transformer dir (`config.json`, or a pipeline dir with `transformer/config.json`) rather than
    a LoRA (a PEFT dir or a diffusers LoRA file/dir): such a teacher is a second frozen model (engine/student.py)."""
    if not path.is_dir() or (path / PEFT_CONFIG).is_file() or (path / DIFFUSERS_WEIGHTS).is_file():
        return False
    return (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file()


class AdapterSwitch:
    """Cheap switching of the active field: an adapter name, or None for the base (adapters disabled)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = lora_layers(model)
        self.current: str | None = None
        self.activate(STUDENT if STUDENT in adapter_names(model) else None)

    def refresh(self) -> None:
        """Re-read the model's LoRA layers (after adapters were added)."""
        self.layers = lora_layers(self.model)
        self.activate(self.current)

    def activate(self, name: str | None) -> None:
        """Make `name` the active adapter (None: adapters disabled, the base)."""
        if name is not None and name not in adapter_names(self.model):
            raise KeyError(f"no adapter named {name!r}; loaded: {adapter_names(self.model)}")
        active = [*companions(self.model, name), name]
        for layer in self.layers:
            if name is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = active
        self.current = name

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """`name` active inside the block, the previous one restored after."""
        previous = self.current
        self.activate(name)
        try:
            yield
        finally:
            self.activate(previous)


# --------------------------------------------------------------------------------------------- teachers


def _strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise AdapterError(f"adapter weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise AdapterError(f"cannot read adapter weights {path}: {exc}") from exc


def _verify_sums(directory: Path, name: str | None) -> None:
    from engine.files import verify_sha256sums

    if bad := verify_sha256sums(directory, only=name):
        raise AdapterError("; ".join(bad))


def _rank_and_targets(state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    # full module paths: suffixes like "0" (of "to_out.0") would also match "transformer_blocks.0"
    targets = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if len(ranks) != 1:
        raise AdapterError(f"expected one LoRA rank in the adapter, found {sorted(ranks)}")
    return ranks.pop(), targets


def read_adapter(path: str | Path, alpha: float | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """Read a PEFT adapter dir or a diffusers LoRA file: (peft config, state with module-relative keys, file).

    diffusers files carry the adapter config as safetensors metadata; a file without it and without
    kohya-style `.alpha` entries would silently load at scale alpha/r = 1 (the diffusers alpha pitfall), so
    such files are refused unless `alpha` is given explicitly.
    """
    path = Path(path)
    if path.is_dir() and (path / PEFT_CONFIG).is_file():
        weights = path / PEFT_WEIGHTS
        try:
            raw_cfg = json.loads((path / PEFT_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdapterError(f"cannot parse {path / PEFT_CONFIG}: {exc}") from exc
        _verify_sums(path, None)
        state, _ = _read_safetensors(weights)
        state = _strip_prefix(state, ("base_model.model.", "transformer."))
        cfg_kwargs = {k: v for k, v in raw_cfg.items() if k in LoraConfig.__dataclass_fields__}
        if alpha is not None:
            cfg_kwargs["lora_alpha"] = alpha
        elif "lora_alpha" not in cfg_kwargs:  # peft would take its default 8 whatever the rank
            raise AdapterError(f"{path / PEFT_CONFIG} has no lora_alpha, so the adapter's scale alpha/r is unknown; "
                               f"set the teacher's `alpha` in the config explicitly")
        return LoraConfig(**cfg_kwargs), state, weights
    weights = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    _verify_sums(weights.parent, weights.name)
    state, metadata = _read_safetensors(weights)
    state = _strip_prefix(state, ("transformer.", "base_model.model."))
    rank, targets = _rank_and_targets(state)
    kohya_alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    if DIFFUSERS_METADATA_KEY in metadata:
        meta = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        # diffusers prefixes each key with the component name ("transformer.r", "transformer.lora_alpha", ...)
        meta = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in meta.items()}
        cfg_kwargs = {k: v for k, v in meta.items() if k in LoraConfig.__dataclass_fields__}
        if alpha is not None:
            cfg_kwargs["lora_alpha"] = alpha
        elif "lora_alpha" not in cfg_kwargs:
            raise AdapterError(f"{weights}: its {DIFFUSERS_METADATA_KEY} has no lora_alpha, so the scale alpha/r is "
                               f"unknown; set the teacher's `alpha` in the config explicitly")
        return LoraConfig(**cfg_kwargs), state, weights
    if alpha is None and kohya_alphas:
        values = {float(v) for v in kohya_alphas.values()}
        if len(values) != 1:
            raise AdapterError(f"{weights}: per-module alphas {sorted(values)} are not supported")
        alpha = values.pop()
    if alpha is None:
        raise AdapterError(
            f"{weights} has no adapter metadata ({DIFFUSERS_METADATA_KEY}) and no '.alpha' entries, so its "
            f"scale alpha/r is unknown; set the teacher's `alpha` in the config explicitly"
        )
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), state, weights


def load_adapter(model: torch.nn.Module, name: str, path: str | Path, alpha: float | None = None) -> LoraConfig:
    """Load a teacher adapter from `path` as named adapter `name`, verifying every key and shape."""
    config, state, weights = read_adapter(path, alpha)
    config.inference_mode = True
    if name in adapter_names(model):
        raise AdapterError(f"an adapter named {name!r} is already loaded")
    try:
        model.add_adapter(config, adapter_name=name)
    except ValueError as exc:  # e.g. target modules that do not exist in this model
        raise AdapterError(f"{weights}: does not fit this model: {exc}") from exc
    expected = {
        k for k in get_peft_model_state_dict(model, adapter_name=name).keys() if ".lora_" in k
    }
    given = {k for k in state if ".lora_" in k}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} LoRA weights missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights match no module of this model (e.g. {unexpected[:3]})")
    if not problems:
        model_state = get_peft_model_state_dict(model, adapter_name=name)
        for key in sorted(given):
            if tuple(state[key].shape) != tuple(model_state[key].shape):
                problems.append(
                    f"{key}: shape {tuple(state[key].shape)} != model {tuple(model_state[key].shape)} (adapter rank "
                    f"{config.r} from its config)"
                )
                break
    nonfinite = [k for k in sorted(given) if not bool(torch.isfinite(state[k]).all())]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensors hold NaN/Inf (e.g. {nonfinite[:3]})")
    if problems:
        model.delete_adapters(name)
        raise AdapterError(f"adapter {weights} does not match the model: " + "; ".join(problems))
    set_peft_model_state_dict(model, state, adapter_name=name)
    return config


def random_adapter(model: torch.nn.Module, name: str, spec: LoraSpec, seed: int, std: float = 0.1) -> None:
    """A random, non-zero adapter (both A and B drawn), for tests and the `tiny` preset's stand-in teachers.

    Entries ~ N(0, std^2 * 64 / fan_in): with the `tiny` preset (width 32, r = 4) a teacher moves the base's
    velocity by ~10% of its norm, different enough per teacher that routing matters."""
    add_adapter(model, name, spec)
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
            fan_in = weight.shape[1]
            draw = torch.randn(weight.shape, generator=gen) * (std * math.sqrt(64.0 / max(fan_in, 1)))
            with torch.no_grad():
                weight.copy_(draw.to(weight.dtype))


def adapter_scale(model: torch.nn.Module, name: str) -> float:
    """peft's scale of adapter `name`: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    cfg = model.peft_config[name]
    return float(cfg.lora_alpha) / float(cfg.r) if not cfg.use_rslora else float(cfg.lora_alpha) / math.sqrt(cfg.r)


def load_teachers(model: torch.nn.Module, teachers: Sequence[Any], targets: Sequence[str]) -> None:
    """Every LoRA `[[teachers]]` entry (engine.config.schema.TeacherConfig) as a named adapter on `model`: loaded from
    its path (`<world>:` paths resolved, alpha override applied) or, with `random_seed >= 0`, a random stand-in on
    `targets`. Full-checkpoint teachers (`is_full_checkpoint`) are skipped: they are models of their own."""
    from engine.config.io import resolve_path

    for t in teachers:
        if t.random_seed >= 0:
            random_adapter(model, t.name, LoraSpec(t.rank, float(t.rank), tuple(targets)), t.random_seed)
        elif not is_full_checkpoint(resolve_path(t.path)):  # full checkpoints: engine.student.load_full_teachers
            load_adapter(model, t.name, resolve_path(t.path), alpha=t.alpha or None)
