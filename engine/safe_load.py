"""Reading torch pickles without running code (DESIGN §5: checkpoints "load without unpickling code").

A `torch.save` file is a pickle: `torch.load(weights_only=False)`, which DeepSpeed's `load_checkpoint`, its
universal-checkpoint loader and `ds_to_universal` all use, runs whatever callable the file names (measured: a planted
`os.system` payload in a re-hashed checkpoint ran on a normal re-run). Here every load is `weights_only=True`: torch's
restricted unpickler builds only tensors, containers and primitives, plus the few DeepSpeed classes its checkpoints
hold (`SAFE_GLOBALS`, found by saving real ZeRO-2 checkpoints of the tiny config in float32 and bfloat16, single rank
and universal, and listing every global `weights_only=True` refused). A file that names anything else is refused with
`UnsafeCheckpointError` naming the file and the global; nothing of it runs.

- `load(path)`: one file, the safe way.
- `scan(path)`: the same, memory-mapped (zip format: the tensors are not read), to vet a file before use.
- `only_safe_loads()`: while active, every `torch.load` in the process is `load` (for DeepSpeed code that calls
  `torch.load(weights_only=False)` itself).
- `python -m engine.safe_load <module> [args]`: run a module's `__main__` (e.g. `deepspeed.checkpoint.ds_to_universal`)
  with `only_safe_loads()` active.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import runpy
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError

# (module, name) of every non-builtin global in a DeepSpeed 0.19 ZeRO checkpoint of this engine: the optimizer-state
# file's `loss_scaler` (LossScaler; DynamicLossScaler with fp16), `zero_stage` (ZeroStageEnum) and
# `param_slice_mappings` (fragment_address). Classes only: unpickling one sets attributes, it calls no code of ours.
SAFE_GLOBALS: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

_torch_load = torch.load  # the real one, kept before `only_safe_loads` may replace the attribute
_patch_lock = threading.Lock()
_patch_depth = 0


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that `weights_only=True` refuses: it names code to run (a planted payload, or a type this
    engine never writes). The message names the file."""


def safe_globals() -> list[Any]:
    """The allow-listed classes that are importable here (DeepSpeed is optional for the loader itself)."""
    found = []
    for module, name in SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def load(path: Any, map_location: Any = None, mmap: bool | None = None, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` with `SAFE_GLOBALS` allowed; UnsafeCheckpointError names the file."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n", 1)[0]
        raise UnsafeCheckpointError(f"{path} is refused: it is not plain tensor data and could run code when "
                                    f"loaded ({reason}); it was not loaded") from None


def scan(path: str | Path) -> None:
    """Vet `path` (raises UnsafeCheckpointError): the pickle is read, the tensors only mapped (zip format)."""
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"  # torch's zip format; the legacy format cannot be memory-mapped
    load(path, map_location="cpu", mmap=zipped)


def _load_any(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
              mmap: bool | None = None, **kwargs: Any) -> Any:
    """Stand-in for `torch.load` under `only_safe_loads`: whatever the caller asked for, weights_only."""
    return load(f, map_location, mmap, **kwargs)


@contextlib.contextmanager
def only_safe_loads() -> Iterator[None]:
    """Within the block every `torch.load` call of any module is `weights_only=True` (nested use is fine)."""
    global _patch_depth
    with _patch_lock:
        _patch_depth += 1
        torch.load = _load_any
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                torch.load = _torch_load


def main(argv: list[str]) -> int:
    """`python -m engine.safe_load <module> [args...]`: run `<module>` as __main__ with only safe loads."""
    if not argv:
        print("usage: python -m engine.safe_load <module> [args...]", file=sys.stderr)
        return 2
    sys.argv = argv
    with only_safe_loads():
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except UnsafeCheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
