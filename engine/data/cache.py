"""Prompt-embedding cache: every distinct prompt (+ the empty prompt) encoded once, stored as safetensors, read row by
row.

The file holds one tensor per field of the model family's conditioning (SD3: `prompt_embeds` [N, L, D] and `pooled`
[N, P]; row 0 = the unconditional "" prompt) in the model's dtype, and, as metadata, the prompt list and the encoder
identity. At real size this matters: SD3.5's 333 x 4096 + 2048 floats are 5.46 MB per prompt in float32, so 10k
prompts are 55 GB, which every rank used to hold in memory. Now the file is written in batches (`write_rows`: the
header first, each batch of rows at its offsets, so building needs one batch of memory), stored in bfloat16 on GPU runs
(half the size; the model casts its inputs to its dtype anyway, so the values it computes with are the same), and each
rank reads only the rows of its own batches with positioned reads (`PromptEmbeddings.cond`): nothing is memory-mapped,
so reading never grows a process's resident memory past one batch.

A cache whose metadata does not match the current prompts/encoder, or whose dtype is narrower than the run's, is
rebuilt, never silently reused; a float32 cache serves a bfloat16/float16 run (rows are cast when read, the same
rounding the model applies). A corrupt file is reported by name and rebuilt. Only the JSON header and raw tensor
bytes are parsed: nothing in the file can run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from pathlib import Path

import torch

from engine.backends.base import TensorCond, TextEncoder

log = logging.getLogger(__name__)
UNCOND = ""
BATCH = 32  # prompts per encoder call (SD3.5 in float32: 175 MB of embeddings per batch)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def prompts_digest(prompts: list[str]) -> str:
    """16 hex digits keying a prompt list (order matters)."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


class RowFile:
    """Rows of the tensors of a safetensors file, read with positioned reads (header parsed once, file kept open)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(os.pread(self.fd, n, 8))
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self.start = 8 + n
            self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, info in header.items():
                dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
                if not shape or end - begin != math.prod(shape) * dtype.itemsize or self.start + end > size:
                    raise ValueError(f"tensor {name!r}: shape {shape} does not match its bytes {begin}..{end}")
                self.tensors[name] = (dtype, shape, self.start + begin)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            self.close()
            raise

    def rows(self, name: str, index: list[int]) -> torch.Tensor:
        """Rows `index` (in that order) of tensor `name`, read from the file."""
        dtype, shape, offset = self.tensors[name]
        if self.fd < 0:  # closed by the trainer's close(); read again after it, e.g. in a test
            self.fd = os.open(self.path, os.O_RDONLY)
        row = math.prod(shape[1:]) * dtype.itemsize
        buf = bytearray(row * len(index))
        for j, i in enumerate(index):
            if not 0 <= i < shape[0]:
                raise IndexError(f"{self.path}: row {i} of {name!r} (it has {shape[0]})")
            got = os.preadv(self.fd, [memoryview(buf)[j * row : (j + 1) * row]], offset + i * row)
            if got != row:
                raise OSError(f"{self.path}: short read of row {i} of {name!r} (truncated file?)")
        # a field with zero-size rows (Z-Image's `siglip` [N, 0, 0] without a SigLIP branch) still has len(index) rows
        return torch.frombuffer(buf, dtype=dtype).reshape(len(index), *shape[1:]) if buf else \
            torch.empty(len(index), *shape[1:], dtype=dtype)

    def close(self) -> None:
        """Close the file (a later `rows` opens it again)."""
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


class PromptEmbeddings:
    """Encoded prompts, indexable by prompt text; rows come from the cache file (or from memory without one)."""

    def __init__(self, prompts: list[str], cond_type: type[TensorCond], source: RowFile | TensorCond,
                 dtype: torch.dtype | None = None):
        self.prompts = prompts
        self._index = {p: i for i, p in enumerate(prompts)}
        self.cond_type, self.source, self.dtype = cond_type, source, dtype

    def rows(self, index: list[int]) -> TensorCond:
        """The conditioning of rows `index` (floating fields in the run's dtype)."""
        if isinstance(self.source, RowFile):
            cond = self.cond_type.from_tensors({k: self.source.rows(k, index) for k in self.source.tensors})
        else:
            cond = self.source[torch.tensor(index, dtype=torch.long)]
        return cond.to(dtype=self.dtype) if self.dtype is not None else cond

    def cond(self, texts: list[str]) -> TensorCond:
        """The conditioning of `texts` (rows in that order); reads only those rows."""
        return self.rows([self._index[t] for t in texts])

    @property
    def uncond(self) -> TensorCond:
        """The empty prompt's conditioning (batch 1)."""
        return self.cond([UNCOND])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each stored field ([prompts, ...]) without reading it."""
        if isinstance(self.source, RowFile):
            return {k: shape for k, (_, shape, _) in self.source.tensors.items()}
        return {k: tuple(v.shape) for k, v in self.source.tensors().items()}

    def close(self) -> None:
        """Close the cache file (a later read opens it again)."""
        if isinstance(self.source, RowFile):
            self.source.close()

    @property
    def table(self) -> TensorCond:
        """Every prompt's conditioning, row i = prompts[i] (reads the whole file: small sets and tests only)."""
        return self.rows(list(range(len(self.prompts))))


def _cast(cond: TensorCond, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in cond.tensors().items()}


def write_rows(encoder: TextEncoder, prompts: list[str], path: Path, dtype: torch.dtype, metadata: dict[str, str],
               batch: int = BATCH) -> None:
    """Encode `prompts` in batches straight into a safetensors file at `path` (floating fields in `dtype`): the
    header from the first batch's row shapes, then every batch's rows written at their offsets."""
    first = _cast(encoder.encode(prompts[:batch]), dtype)
    n = len(prompts)
    layout, offset = {}, 0
    for name in sorted(first):
        t = first[name]
        nbytes = n * math.prod(t.shape[1:]) * t.element_size()
        layout[name] = {"dtype": _NAMES[t.dtype], "shape": [n, *t.shape[1:]], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": metadata, **layout}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(start + offset)
        for i in range(0, n, batch):
            part, first = first or _cast(encoder.encode(prompts[i : i + batch]), dtype), {}
            for name, t in part.items():
                row = t[0].numel() * t.element_size()
                fh.seek(start + layout[name]["data_offsets"][0] + i * row)
                fh.write(t.reshape(-1).view(torch.uint8).numpy())  # a view: no copy of the batch
        fh.flush()
        os.fsync(fh.fileno())


def _usable(rows: RowFile, digest: str, encoder: TextEncoder, dtype: torch.dtype) -> str:
    """'' when the cache file fits, else why not."""
    meta = rows.metadata
    if meta.get("digest") != digest or meta.get("encoder") != encoder.identity:
        return "it is for other prompts/encoder"
    stored = {t[0] for t in rows.tensors.values() if t[0].is_floating_point}
    if stored - {dtype, torch.float32}:
        return f"it is stored in {sorted(map(str, stored))}, narrower than this run's {dtype}"
    return ""


def load_or_build(encoder: TextEncoder, prompts: list[str], path: str | Path | None, cond_type: type[TensorCond],
                  dtype: torch.dtype = torch.float32) -> PromptEmbeddings:
    """Embeddings of `prompts` (deduplicated, with "" first) from the cache at `path`, building it if needed, with
    floating fields in `dtype` (the model's); `cond_type` is the family's conditioning class (the cache's tensors
    are its fields). Without a `path` everything stays in memory."""
    unique = [UNCOND] + sorted(set(prompts) - {UNCOND})
    digest = prompts_digest(unique)
    if path is None:
        parts = [encoder.encode(unique[i : i + BATCH]) for i in range(0, len(unique), BATCH)]
        return PromptEmbeddings(unique, cond_type, cond_type.from_tensors(_cast(cond_type.cat(parts), dtype)))
    path = Path(path)
    if path.is_file():
        try:
            rows = RowFile(path)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:  # corrupt/truncated: say which
            log.warning("prompt cache %s is unreadable (%s): rebuilding", path, exc)
        else:
            why = _usable(rows, digest, encoder, dtype)
            if not why:
                return PromptEmbeddings(json.loads(rows.metadata["prompts"]), cond_type, rows, dtype)
            rows.close()
            log.info("prompt cache %s: %s; rebuilding", path, why)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_rows(encoder, unique, tmp, dtype,
               {"digest": digest, "encoder": encoder.identity, "prompts": json.dumps(unique)})
    mask = os.umask(0)  # a `data.cache` shared between users needs the umask's mode (safetensors used 0600)
    os.umask(mask)
    tmp.chmod(0o666 & ~mask)
    os.replace(tmp, path)
    return PromptEmbeddings(unique, cond_type, RowFile(path), dtype)
