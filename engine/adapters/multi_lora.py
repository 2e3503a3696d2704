"""Segmented multi-LoRA layers: every adapter of a model in ONE forward with a per-row adapter id (DESIGN §3).

All fields of an iteration (routed teachers, CFG conditional + unconditional rows, the anchor with adapters
off, the student) are LoRA adapters on one frozen base, so their query rows can run as ONE batched forward
with a per-row adapter id. This module is the layer half; the evaluator (`engine.fields.batched`) plans the rows.

- `install_multi_lora(model)` turns peft's `lora.Linear` layers into `MultiLoraLinear` in place (a class
  swap: same module objects, same parameters, same state_dict keys, still `LoraLayer` instances). Outside a
  `MultiLoraState.segments(batch)` context the layer IS peft's layer (`super().forward`): plain forwards,
  `AdapterSwitch`, merging, saving and export behave exactly as before. Inside the context every targeted
  projection runs `lora_segmented` (kernels/lora_segmented.py) with the batch's segment metadata, ignoring
  peft's active-adapter state. peft's parameters stay the source of truth: each layer keeps a stacked,
  zero-padded copy of all adapters ([n, R, in], [n, out, R], scales [n]) refreshed from them when they
  change (checked by tensor version at context entry), and the trainable adapter's parameters are spliced
  into the stack differentiably, so its peft parameters receive the gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from engine.adapters.lora import STUDENT, adapter_names, lora_layers
from engine.ops import lora_segmented
from engine.transfer import device_ints, to_device

# ----------------------------------------------------------------------------------------- segment batch


@dataclass(frozen=True)
class SegmentBatch:
    """Per-row adapter slots of one batched forward as segment metadata on the device."""

    seg_indptr: torch.Tensor
    """[n_seg + 1] int32 row boundaries of the segments (rows = dim 0 of every projection input)."""
    seg_adapter: torch.Tensor
    """[n_seg] int32 adapter slot of each segment, -1 = base (no adapter)."""
    rows: int
    present: frozenset[int] = field(default_factory=frozenset)
    """Slots with at least one row (known on the host, so no device read is needed to decide anything)."""
    host_bounds: tuple[int, ...] = ()
    """`seg_indptr` on the host (empty for a padded batch, whose device metadata may be overwritten later)."""
    host_adapters: tuple[int, ...] = ()
    """`seg_adapter` as known on the host when the batch was made."""

    @staticmethod
    def from_slots(slots: Sequence[int], device: torch.device | str, pad_to: int | None = None) -> SegmentBatch:
        """Segments = runs of equal consecutive slots (sort rows by slot first to get one per adapter).

        `pad_to` appends empty segments up to that count: the segment count is a kernel argument, so a
        captured CUDA graph replays correctly with new metadata copied into the same tensors only if it is fixed.
        """
        bounds, ids = [0], []
        for i, s in enumerate(slots):
            if not ids or s != ids[-1]:
                if ids:
                    bounds.append(i)
                ids.append(int(s))
        bounds.append(len(slots))
        if not ids:
            bounds = [0]
        if pad_to is not None:
            if pad_to < len(ids):
                raise ValueError(f"{len(ids)} segments do not fit pad_to={pad_to}")
            bounds += [len(slots)] * (pad_to - len(ids))
            ids += [-1] * (pad_to - len(ids))
        present = frozenset(s for s in ids if s >= 0)
        if pad_to is None:  # the same few row plans every step: device copies made once (engine/transfer.py)
            indptr, adapter = device_ints(bounds, device, torch.int32), device_ints(ids, device, torch.int32)
            return SegmentBatch(indptr, adapter, len(slots), present, tuple(bounds), tuple(ids))
        # fresh tensors: a padded batch's metadata is meant to be overwritten in place (graph replays), so the host
        # copy is not kept (nothing may decide on it)
        indptr = to_device(torch.tensor(bounds, dtype=torch.int32), device)
        adapter = to_device(torch.tensor(ids, dtype=torch.int32), device)
        return SegmentBatch(indptr, adapter, len(slots), present)


# ---------------------------------------------------------------------------------------------- the layer


@dataclass
class _Stack:
    a: torch.Tensor
    """[n, R, in] stacked lora_A weights, zero-padded to the layer's largest rank R."""
    b: torch.Tensor
    """[n, out, R] stacked lora_B weights."""
    scales: torch.Tensor
    """[n] float32 peft `scaling` per adapter (alpha / r, or alpha / sqrt(r) for rsLoRA); 0 where absent."""
    signature: list
    scale_values: list[float]
    slots: tuple[str, ...]
    """Adapter names in slot order; any change rebuilds the stack (a frozen adapter's weights may live in it)."""
    slot_index: dict[int, torch.Tensor] = field(default_factory=dict)
    """Cached [1] index tensors on the stack's device (no host-to-device copy per forward)."""


class MultiLoraState:
    """Shared by the installed layers of one model: adapter slots, the active batch, the trainable adapter."""

    def __init__(self, model: torch.nn.Module, trainable: str | None = STUDENT, share_frozen: bool = True,
                 merge_rows: int = 0):
        self.model = model
        self.trainable = trainable
        self.share_frozen = share_frozen
        """Point frozen adapters' peft weights at their slot of the stack (memory: base + 1x adapters)."""
        self.merge_rows = merge_rows
        """Segments of at least this many token rows (batch rows x tokens per row) of an adapter that gets no
        gradient run as one GEMM against W + s B A (`MultiLoraLinear._merged_segments`); 0 = never."""
        self.slots: list[str] = []
        self.layers: list[MultiLoraLinear] = []
        self.batch: SegmentBatch | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read peft's adapters and layers (after adding/deleting adapters or new target modules)."""
        self.slots = adapter_names(self.model)
        self.layers = []
        for layer in lora_layers(self.model):
            _check_layer(layer)
            if not isinstance(layer, MultiLoraLinear):
                layer.__class__ = MultiLoraLinear
                layer._mlora_stack = None
            layer._mlora = self
            self.layers.append(layer)

    def slot(self, adapter: str | None) -> int:
        """The stack slot of `adapter` (-1 = the base, no adapter)."""
        if adapter is None:
            return -1
        if adapter not in self.slots:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {self.slots}")
        return self.slots.index(adapter)

    @property
    def trainable_slot(self) -> int | None:
        """The trainable adapter's slot, or None when it is not loaded."""
        return self.slots.index(self.trainable) if self.trainable in self.slots else None

    def sync(self) -> None:
        """Refresh every layer's stacked copy from peft's parameters where they changed since the last sync."""
        if adapter_names(self.model) != self.slots:
            self.refresh()
        for layer in self.layers:
            layer._mlora_sync()

    @contextmanager
    def segments(self, batch: SegmentBatch) -> Iterator[None]:
        """Forwards inside run every installed layer segmented by `batch` (rows = dim 0 of the model input)."""
        if torch.is_grad_enabled() and getattr(self.model, "gradient_checkpointing", False):
            # A checkpointed block recomputes its forward during backward, outside this context, where the
            # layers are plain peft layers again: the recomputation would silently use the wrong adapters.
            raise RuntimeError("segmented multi-LoRA forwards with grad do not support gradient checkpointing")
        self.sync()
        previous, self.batch = self.batch, batch
        try:
            yield
        finally:
            self.batch = previous


def _check_layer(layer: torch.nn.Module) -> None:
    if not isinstance(layer, LoraLinear) or not isinstance(layer.get_base_layer(), torch.nn.Linear):
        raise TypeError(f"segmented multi-LoRA supports peft lora.Linear over nn.Linear only, got {type(layer)}")


class MultiLoraLinear(LoraLinear):
    """peft's `lora.Linear` with a segmented multi-adapter forward while a `SegmentBatch` is active."""

    _mlora: MultiLoraState
    _mlora_stack: _Stack | None

    def _mlora_sync(self) -> None:
        slots = self._mlora.slots
        base = self.get_base_layer().weight
        entries = []
        for name in slots:
            if name not in self.lora_A:
                entries.append(None)
                continue
            if self.lora_variant.get(name) is not None or self.lora_bias.get(name, False):
                raise NotImplementedError(f"adapter {name!r}: DoRA/LoRA variants and lora_bias are not supported")
            drop = self.lora_dropout[name]
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and drop.training:
                raise NotImplementedError(f"adapter {name!r}: active LoRA dropout is not supported")
            entries.append((self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])))
        rank = max([e[0].shape[0] for e in entries if e is not None], default=1)
        stack = self._mlora_stack
        shape_a = (len(slots), rank, self.in_features)
        rebuild = (
            stack is None
            or stack.slots != tuple(slots)
            or tuple(stack.a.shape) != shape_a
            or stack.a.device != base.device
            or stack.a.dtype != base.dtype
        )
        if rebuild:
            stack = _Stack(
                a=torch.zeros(shape_a, device=base.device, dtype=base.dtype),
                b=torch.zeros((len(slots), self.out_features, rank), device=base.device, dtype=base.dtype),
                scales=torch.zeros(len(slots), device=base.device, dtype=torch.float32),
                signature=[None] * len(slots),
                scale_values=[0.0] * len(slots),
                slots=tuple(slots),
            )
        share = self._mlora.share_frozen
        signature = []
        with torch.no_grad():
            for i, entry in enumerate(entries):
                old = stack.signature[i]
                if entry is None:
                    if old is not None:
                        stack.a[i].zero_()
                        stack.b[i].zero_()
                    signature.append(None)
                    continue
                a, b, _ = entry
                r = a.shape[0]
                parts = []
                for j, (p, dst, pad) in enumerate(
                    ((a, stack.a[i, :r], stack.a[i, r:]), (b, stack.b[i, :, :r], stack.b[i, :, r:]))
                ):
                    if p.data_ptr() == dst.data_ptr() and p.shape == dst.shape and p.stride() == dst.stride():
                        parts.append(("shared", p.data_ptr()))  # p is this stack's memory: nothing to copy
                        continue
                    sig = (p.data_ptr(), p._version)
                    if old is None or old[j] != sig:
                        dst.copy_(p)
                        pad.zero_()
                        if share and not p.requires_grad and p.dtype == dst.dtype and dst.is_contiguous():
                            p.data = dst  # a frozen adapter's peft weight becomes a view of the stack: no 2nd copy
                            sig = ("shared", p.data_ptr())
                    parts.append(sig)
                signature.append(tuple(parts))
        stack.signature = signature
        values = [0.0 if e is None else e[2] for e in entries]
        if values != stack.scale_values:
            stack.scales = torch.tensor(values, dtype=torch.float32).to(base.device)
            stack.scale_values = values
        self._mlora_stack = stack

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """peft's forward, or the segmented multi-adapter forward while a SegmentBatch is active."""
        state = getattr(self, "_mlora", None)
        batch = None if state is None else state.batch
        if batch is None:
            return super().forward(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError("the segmented multi-LoRA forward takes the input only")
        if self.merged:
            raise RuntimeError("unmerge the adapters before a segmented multi-LoRA forward")
        if x.shape[0] != batch.rows:
            raise ValueError(f"segmented forward: input has {x.shape[0]} rows, the segment batch {batch.rows}")
        stack = self._mlora_stack
        assert stack is not None, "MultiLoraState.segments() syncs the stacks before any forward"
        a, b, trainable = stack.a, stack.b, None
        t = state.trainable_slot
        if t is not None and t in batch.present and torch.is_grad_enabled() and state.trainable in self.lora_A:
            pa, pb = self.lora_A[state.trainable].weight, self.lora_B[state.trainable].weight
            if pa.requires_grad or pb.requires_grad:
                # Splice the live parameters into the stack so autograd routes the slot's grads to peft.
                pad = a.shape[1] - pa.shape[0]
                idx = stack.slot_index.get(t)
                if idx is None:
                    idx = stack.slot_index[t] = torch.tensor([t], device=a.device)
                a = a.index_copy(0, idx, F.pad(pa.to(a.dtype), (0, 0, 0, pad))[None])
                b = b.index_copy(0, idx, F.pad(pb.to(b.dtype), (0, pad))[None])
                trainable = t
        base = self.get_base_layer()
        if state.merge_rows and batch.host_bounds:
            keep = t if torch.is_grad_enabled() else None  # the student's rows stay segmented while it may train
            y = self._merged_segments(x, a, b, stack, batch, state.merge_rows, keep, trainable)
            if y is not None:
                return y
        return lora_segmented(x, base.weight, base.bias, a, b, stack.scales, batch.seg_indptr, batch.seg_adapter,
                              trainable)

    def _merged_segments(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stack: _Stack,
                         batch: SegmentBatch, threshold: int, keep: int | None,
                         trainable: int | None) -> torch.Tensor | None:
        """The forward with every large frozen segment as ONE GEMM against W_i = W + s_i B_i A_i (None: no segment
        is large). A segment of m token rows costs the segmented path m (K + 2N) elements of extra traffic (shrink
        reads x, expand reads and writes y) and the merge 2 N K (read W, write W_i): merging pays from m ~ 2NK / (K +
        2N), 1024 token rows for SD3.5-M's 1536-wide projections (one 512 px image); `merge_rows` is where it does
        measurably (bench/test_multi_teacher.py `merged-segments`). Slot `keep` (the student while grad is on: its
        weight gradients stay the segmented op's) and the runs of small segments between large ones keep the
        segmented op (`trainable` as there); rows outside every segment are base rows.
        """
        rows, n_out = x.shape[0], self.out_features
        tokens = x.numel() // max(rows * x.shape[-1], 1)
        bounds, slots = batch.host_bounds, batch.host_adapters
        pieces: list[tuple[int, int, int | None]] = []  # (lo, hi, merged slot or None for a segmented run)
        for s, slot in enumerate(slots):
            lo, hi = bounds[s], bounds[s + 1]
            if slot >= 0 and slot != keep and (hi - lo) * tokens >= threshold:
                pieces.append((lo, hi, slot))
            elif hi > lo:
                if pieces and pieces[-1][2] is None and pieces[-1][1] == lo:
                    lo = pieces.pop()[0]
                pieces.append((lo, hi, None))
        if not any(p[2] is not None for p in pieces):
            return None
        if bounds[-1] < rows:  # rows after the last segment: base rows, segmented run without segments
            pieces.append((bounds[-1], rows, None))
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        grad = torch.is_grad_enabled()
        y = None if grad else x.new_empty((*x.shape[:-1], n_out))
        outs = []
        for lo, hi, slot in pieces:
            xs = x[lo:hi]
            if slot is not None:
                w = torch.addmm(weight, b[slot].to(weight.dtype), a[slot].to(weight.dtype),
                                alpha=stack.scale_values[slot])
                if grad:
                    outs.append(F.linear(xs, w, bias))
                else:  # straight into the output rows: no piece tensor, no concatenation
                    x2, y2 = xs.reshape(-1, xs.shape[-1]), y[lo:hi].view(-1, n_out)
                    torch.addmm(bias, x2, w.t(), out=y2) if bias is not None else torch.mm(x2, w.t(), out=y2)
                continue
            sub = [(min(bounds[s + 1], hi) - lo, slot_s) for s, slot_s in enumerate(slots)
                   if bounds[s + 1] > lo and bounds[s] < hi]
            if all(sl < 0 for _, sl in sub):  # base rows only
                piece = F.linear(xs, weight, bias)
            else:
                seg_b = device_ints([0] + [e for e, _ in sub], x.device, torch.int32)
                seg_a = device_ints([sl for _, sl in sub], x.device, torch.int32)
                piece = lora_segmented(xs, weight, bias, a, b, stack.scales, seg_b, seg_a, trainable)
            if grad:
                outs.append(piece)
            else:
                y[lo:hi].copy_(piece)
        return torch.cat(outs) if grad else y


def install_multi_lora(
    model: torch.nn.Module, trainable: str | None = STUDENT, share_frozen: bool = True, merge_rows: int = 0
) -> MultiLoraState:
    """Install (idempotently) the segmented layers on every peft LoRA layer of `model`; returns the state.

    `share_frozen`: at the first segmented forward, frozen adapters' peft weights are re-pointed (`.data`)
    at their slot of the stacked copy where that slot is contiguous, so K teachers cost one copy of their
    weights, not two; values, names and state_dict are unchanged. `merge_rows`: see `MultiLoraState.merge_rows`.
    """
    state = getattr(model, "_flowopd_multi_lora", None)
    if state is None:
        state = MultiLoraState(model, trainable, share_frozen, merge_rows)
        model._flowopd_multi_lora = state
    else:
        state.trainable = trainable
        state.share_frozen = share_frozen
        state.merge_rows = merge_rows
        state.refresh()
    return state


def uninstall_multi_lora(model: torch.nn.Module) -> None:
    """Give the layers back to peft's class (nothing else was changed)."""
    state = getattr(model, "_flowopd_multi_lora", None)
    if state is None:
        return
    for layer in state.layers:
        layer.__class__ = LoraLinear
        del layer._mlora
        del layer._mlora_stack
    del model._flowopd_multi_lora
