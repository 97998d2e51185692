"""Streaming safetensors I/O: write shards tensor by tensor, read one tensor at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw
little-endian tensor bytes, back to back in header order. Because the export knows every
tensor's name, shape and dtype before it loads any weight (from the checkpoint metadata), it
writes each shard's header first and then streams the tensors into it: memory holds one
layer, never a shard. The reader parses headers only and reads single tensors on demand.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from megapatch.convert.common import ConvertError

ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("safetensors I/O here assumes a little-endian machine")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _header_bytes(entries: list[tuple[str, tuple[int, ...], torch.dtype]], meta: dict) -> bytes:
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[name] = {
            "dtype": ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write planned tensors, in plan order, into ``model[-0000k-of-0000n].safetensors``."""

    def __init__(
        self,
        out_dir: str,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.meta = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            n = _nbytes(entry[1], entry[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        self.shards = shards
        total = len(shards)
        self.files = (
            [SINGLE_NAME]
            if total == 1
            else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        )
        self.order = [
            (s, name, shape, dtype) for s, sh in enumerate(shards) for name, shape, dtype in sh
        ]
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._next = 0
        self._shard = -1
        self._file = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next planned tensor (must come in plan order, with its planned shape)."""
        if self._next >= len(self.order):
            raise RuntimeError(f"unplanned tensor {name}: every planned tensor was written")
        shard, want, shape, dtype = self.order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} out of plan: expected "
                f"{want} {shape} {dtype}"
            )
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().cpu()
        assert self._file is not None
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._file = open(os.path.join(self.out_dir, self.files[shard]), "wb")
        self._file.write(_header_bytes(self.shards[shard], self.meta))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> dict[str, str]:
        """Finish the last shard and the index; returns the weight map (name -> file)."""
        self._close_file()
        if self._next != len(self.order):
            missing = [o[1] for o in self.order[self._next : self._next + 3]]
            raise RuntimeError(f"export stopped before writing {missing}...")
        weight_map = {name: self.files[s] for s, name, _, _ in self.order}
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        return weight_map


def save_file(
    tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a small dict of tensors as one safetensors file."""
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, {"format": "pt", **(metadata or {})}))
        for t in tensors.values():
            f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a safetensors file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """Entries and ``__metadata__`` of one safetensors file (reads the header only)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ConvertError(f"{path} is not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConvertError(f"{path} is not a safetensors file (unreadable header)") from None
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    base = 8 + n
    for name, info in header.items():
        dtype = TORCH_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != _nbytes(shape, dtype):
            raise ConvertError(f"{path}: tensor {name} has inconsistent offsets for its shape")
        if base + end > size:
            raise ConvertError(
                f"{path} is truncated: tensor {name} ends at byte {base + end}, the file has "
                f"{size}; download the file again"
            )
        entries[name] = Entry(path, dtype, shape, base + begin, base + end)
    return entries, meta


def read_tensor(entry: Entry) -> Tensor:
    """Load one tensor into memory."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if out.numel():
            got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            if got != entry.end - entry.start:
                raise ConvertError(f"{entry.file}: short read for a tensor; the file is damaged")
    return out


def load_file(path: str) -> dict[str, Tensor]:
    """Every tensor of a (small) safetensors file."""
    entries, _ = read_header(path)
    return {name: read_tensor(e) for name, e in entries.items()}


def open_hf_checkpoint(hf_dir: str) -> dict[str, Entry]:
    """Every tensor of a Hugging Face safetensors checkpoint (headers only, all files checked).

    Reads ``model.safetensors.index.json`` (sharded) or ``model.safetensors``; every shard the
    index names must exist and hold the tensors the index assigns to it.
    """
    index_path = os.path.join(hf_dir, INDEX_NAME)
    single = os.path.join(hf_dir, SINGLE_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConvertError(f"{index_path} is not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(hf_dir, name))]
        if missing:
            shown = ", ".join(missing[:4]) + (
                f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            )
            raise ConvertError(
                f"{hf_dir}: {len(missing)} of {len(files)} shards named by {INDEX_NAME} are "
                f"missing: {shown}; download them (or the complete checkpoint) again"
            )
        entries: dict[str, Entry] = {}
        for name in files:
            found, _ = read_header(os.path.join(hf_dir, name))
            entries.update(found)
        absent = [n for n, file in weight_map.items() if n not in entries]
        if absent:
            raise ConvertError(
                f"{index_path} lists {len(absent)} tensors that its shards do not hold (e.g. "
                f"{absent[0]} in {weight_map[absent[0]]}); the checkpoint is inconsistent"
            )
        return entries
    if os.path.isfile(single):
        return read_header(single)[0]
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir} is not a directory; pass a Hugging Face model directory")
    bins = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
    if bins:
        raise ConvertError(
            f"{hf_dir} holds PyTorch pickles ({bins[0]}), not safetensors; re-save it with "
            "transformers (model.save_pretrained(dir, safe_serialization=True)) and convert that"
        )
    raise ConvertError(f"{hf_dir} has no {SINGLE_NAME} or {INDEX_NAME}; is it a model directory?")
