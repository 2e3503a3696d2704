"""Host-sync census: what in a block of code would copy host data to the GPU or stall the host on it, by file:line.

    with HostSyncCensus(root=repo) as census:
        trainer.train_step(step)
    census.by_site()   # {("h2d", "engine/opd/objective.py:63 < engine/trainer.py:198"): 1, ...}

Kinds of event:
- `h2d`: host data becomes device data: `torch.tensor(list, device=...)`, `.to(device)` / `.cuda()` / `copy_` of a host
  tensor, or an op mixing a host tensor (not 0-d) with device tensors (an implicit copy, e.g. a host index);
- `d2h`: a device value read on the host: `.item()`, `.tolist()`, `float()`, `int()`, `bool()`, `.cpu()`,
  `.numpy()`, or an op whose output size depends on device data (`nonzero`, boolean-mask indexing, ...);
- `sync`: an explicit `torch.cuda.synchronize()`; on CUDA also every call torch's sync debug mode flags
  (`torch.cuda.set_sync_debug_mode("warn")`): a blocking copy or read there is its h2d / d2h event plus a `sync`,
  a pinned non-blocking copy an h2d event only.

On CUDA the devices are real. On a CPU-only machine (`simulate`, the default there) every tensor is on the CPU, so
the census decides what *would* be on the GPU: tensors that existed before the block (model, trajectories) or that
were made with a `device=` argument are device tensors; tensors made from Python data or by factories without a
device, results of ops on host tensors only, and tensors passed to `mark_host` (e.g. a prompt table kept in host
memory) are host tensors. That is the engine's own convention (`device=x.device` everywhere), so a CPU census of a
train step counts what the GPU run would copy and read back (tests/test_host_syncs.py), while the GPU census
(bench/gpu_probe.py) measures it. Each event is attributed to the innermost frames under `root` (the engine's code,
callers after `<`), or to the innermost non-torch frame (DeepSpeed, peft, diffusers) when no repo frame is on
the stack. Overhead: a TorchFunctionMode hook per top-level torch call (~10 us).
"""

from __future__ import annotations

import sysconfig
import traceback
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_FACTORIES = {"tensor", "as_tensor", "asarray", "arange", "zeros", "ones", "empty", "full", "randn", "rand", "randint",
              "randperm", "linspace", "logspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like",
              "randn_like", "rand_like"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}
_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "bincount"}
_TORCH_DIR = str(Path(torch.__file__).parent)
_STDLIB = sysconfig.get_paths()["stdlib"]  # warnings.py, contextlib.py: never where a sync comes from


@dataclass(frozen=True)
class SyncEvent:
    """One would-be copy or stall: its kind, the torch call, and where it came from."""

    kind: str
    """h2d, d2h or sync (module docstring)."""
    call: str
    """The torch function or method, e.g. `tensor`, `Tensor.to`, `item`."""
    site: str
    """`file:line` of the innermost repo frame, then its callers (`a.py:3 < b.py:9`); else the innermost non-torch
    frame."""


class HostSyncCensus(TorchFunctionMode):
    """Records every `SyncEvent` inside the `with` block (see the module docstring)."""

    def __init__(self, root: str | Path, simulate: bool | None = None, depth: int = 3):
        super().__init__()
        self.root = str(Path(root).resolve())
        self.simulate = (not torch.cuda.is_available()) if simulate is None else simulate
        self.depth = depth
        self.events: list[SyncEvent] = []
        self._host: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._sync_mode = 0
        self._patched: Any = None

    # ---------------------------------------------------------------------------------------------- public

    def mark_host(self, *tensors: torch.Tensor) -> None:
        """Treat these tensors as host memory (simulate mode), e.g. a prompt table that stays on the CPU."""
        for t in tensors:
            self._host[id(t)] = t

    def by_site(self, kind: str | None = None) -> Counter:
        """Counts per (kind, site), optionally of one kind."""
        return Counter((e.kind, e.site) for e in self.events if kind is None or e.kind == kind)

    def count(self, kind: str, under: str = "") -> int:
        """Events of `kind` whose site starts with the repo-relative path prefix `under` (e.g. `engine/`)."""
        return sum(e.kind == kind and e.site.startswith(under) for e in self.events)

    # ------------------------------------------------------------------------------------------- machinery

    def __enter__(self) -> HostSyncCensus:
        real = torch.cuda.synchronize
        census = self

        def synchronize(device: Any = None) -> None:
            census._record("sync", "torch.cuda.synchronize")
            real(device)

        self._patched = real
        torch.cuda.synchronize = synchronize
        if not self.simulate:
            self._sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._on_warning
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        torch.cuda.synchronize = self._patched
        if not self.simulate:
            warnings.showwarning = self._showwarning
            self._warnings.__exit__(None, None, None)
            torch.cuda.set_sync_debug_mode(self._sync_mode)

    def _on_warning(self, message: Any, category: type, filename: str, lineno: int, *rest: Any) -> None:
        if "synchronizing" in str(message):
            self._record("sync", "sync-debug: " + str(message).splitlines()[0][:60])
        else:
            self._showwarning(message, category, filename, lineno, *rest)

    def _site(self) -> str:
        """The innermost frame outside torch (repo-relative if in the repo, else `<package>/<file>:line`), then the
        innermost repo frames of other files (`depth` in all); test files do not count as repo frames."""
        frames = [f for f in reversed(traceback.extract_stack()[:-3])
                  if f.filename != __file__ and not f.filename.startswith((_TORCH_DIR, _STDLIB))]
        out: list[str] = []
        seen: set[str] = set()
        for i, f in enumerate(frames):
            # a venv inside the checkout (CI's .venv) holds packages, not repo code
            ours = (f.filename.startswith(self.root) and "/tests/" not in f.filename
                    and "-packages/" not in f.filename)
            if i and not ours or f.filename in seen:
                continue
            name = str(Path(f.filename).relative_to(self.root)) if ours else _short(f.filename)
            out.append(f"{name}:{f.lineno}")
            seen.add(f.filename)
            if len(out) == self.depth:
                break
        return " < ".join(out) or "?"

    def _record(self, kind: str, call: str) -> None:
        self.events.append(SyncEvent(kind, call, self._site()))

    def _is_host(self, t: torch.Tensor) -> bool:
        if self.simulate:
            return self._host.get(id(t)) is t
        return t.device.type == "cpu"

    def _tag(self, out: Any) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = t

    @staticmethod
    def _moved(out: Any, args: tuple) -> Any:
        """A CPU `.to(cpu)` returns its input: give back an alias, so that the moved tensor is a device tensor while
        the source stays a host one (simulate mode)."""
        return out.view_as(out) if args and out is args[0] else out

    def _names_device(self, device: Any) -> bool:
        """A `device=` / `.to(...)` target that is the compute device (simulate: any device named is)."""
        if device is None:
            return False
        return self.simulate or torch.device(device).type != "cpu"

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if self._is_host(t)]
        device = [t for t in tensors if not self._is_host(t)]
        out = func(*args, **kwargs)
        if name in _FROM_DATA or (name in _FACTORIES and not tensors):
            if self._names_device(kwargs.get("device")):
                if name in _FROM_DATA and (host or not tensors):
                    self._record("h2d", name)
                    out = self._moved(out, args)
            elif host or not tensors:
                self._tag(out)
        elif name in ("to", "cuda"):
            target = "cuda" if name == "cuda" else kwargs.get("device", next(
                (a for a in args[1:] if isinstance(a, (torch.device, str))), None))
            if target is None and any(isinstance(a, torch.Tensor) for a in args[1:]):
                target = next(a for a in args[1:] if isinstance(a, torch.Tensor)).device
            if host and self._names_device(target):
                self._record("h2d", f"Tensor.{name}")
                out = self._moved(out, args)
            elif device and target is not None and not self.simulate and torch.device(target).type == "cpu":
                self._record("d2h", f"Tensor.{name}")
            elif host:
                self._tag(out)
        elif name == "copy_":
            if len(args) > 1 and isinstance(args[1], torch.Tensor) and self._is_host(args[1]) \
                    and not self._is_host(args[0]):
                self._record("h2d", "Tensor.copy_")
        elif name in _READS:
            if device:
                self._record("d2h", name)
            if name in ("cpu", "numpy"):
                self._tag(out)
        elif device and (name in _DATA_DEPENDENT or (name == "__getitem__" and _bool_index(args))):
            self._record("d2h", name)
        elif host and device and any(t.ndim > 0 for t in host):
            self._record("h2d", f"{name} (host operand)")
        elif host and not device:
            self._tag(out)
        return out


def _short(filename: str) -> str:
    """A package file as `<package>/<path>` (after site-packages), else its last two path parts."""
    parts = Path(filename).parts
    cut = max((i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")), default=len(parts) - 3)
    return "/".join(parts[cut + 1:])


def _bool_index(args: tuple) -> bool:
    idx = args[1] if len(args) > 1 else None
    leaves = tree_leaves(idx) if isinstance(idx, (tuple, list)) else [idx]
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in leaves)
