"""Megatron dist checkpoints, a piece at a time: partial loads and a disk-staged writer.

A megapatch checkpoint stores every tensor under its global (unsharded) key; per-layer tensors
are one global tensor with a leading layer axis. :class:`DistCheckpoint` loads any sub-block
of it (one layer of a stacked key, one whole tensor) through megatron's ``dist_checkpointing``
(which reassembles it from the chunks of whatever layout saved it), so the tools hold one
layer at a time.

A dist checkpoint is written by ONE ``dist_checkpointing.save`` call. To keep memory at one
layer while converting, :class:`DistWriter` stages each finished tensor into a file in the
output directory and hands megatron a memory-mapped view of it: the resident copy lives in the
page cache (which the kernel can drop), not in process memory. The staging file is removed
after the save; it needs as much free disk as the checkpoint itself.

Every function here is collective over the default process group: alone, a tool forms a
one-rank world; inside a multi-rank world, rank 0 reads and writes, the others take part in
megatron's collective planning with empty requests.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch import Tensor

from megapatch.convert.common import ConvertError, barrier, is_writer
from megapatch.training.checkpoint import (
    CHECKPOINT_META,
    CheckpointError,
    find_latest,
    read_meta,
)

DIST_FILES = ("metadata.json", ".metadata")
_ALIGN = 64


def resolve_checkpoint(path: str) -> str:
    """A complete checkpoint directory: ``path`` itself, or the latest one under a root."""
    if not os.path.exists(path):
        raise ConvertError(f"{path} does not exist; pass a checkpoint directory or a root")
    if os.path.isfile(os.path.join(path, CHECKPOINT_META)) or path.rstrip("/").endswith(".partial"):
        return path
    latest = find_latest(path)
    if latest is not None:
        return latest
    partial = (
        sorted(n for n in os.listdir(path) if n.endswith(".partial")) if os.path.isdir(path) else []
    )
    if partial:
        raise ConvertError(
            f"{path} holds no complete checkpoint, only {partial[-1]} (a save that was "
            "interrupted); resume or redo the run that writes it"
        )
    if os.path.isfile(os.path.join(path, "metadata.json")):
        raise ConvertError(
            f"{path} is a megatron dist checkpoint without {CHECKPOINT_META} (not written by "
            "megapatch, or its save did not finish); megapatch needs its model config"
        )
    raise ConvertError(
        f"{path} is not a megapatch checkpoint or checkpoint root (no {CHECKPOINT_META}, no "
        "iter_* directories)"
    )


@dataclass(frozen=True)
class Request:
    """One piece to load: ``key`` whole, or layer ``layer`` of a layer-stacked key."""

    key: str
    layer: int | None = None


class DistCheckpoint:
    """A complete megapatch checkpoint: its metadata, tensor shapes, and piecewise loads."""

    def __init__(self, path: str) -> None:
        self.path = resolve_checkpoint(path)
        try:
            self.meta = read_meta(self.path)
        except CheckpointError as err:
            raise ConvertError(str(err)) from None
        missing = [n for n in DIST_FILES if not os.path.isfile(os.path.join(self.path, n))]
        if missing:
            raise ConvertError(
                f"{self.path} is incomplete: megatron's {', '.join(missing)} missing; the save "
                "did not finish, use an earlier checkpoint"
            )
        try:
            self.tensors: dict[str, ShardedTensor] = dist_checkpointing.load_tensors_metadata(
                self.path
            )
        except Exception as err:  # noqa: BLE001 - megatron raises many kinds; name the path
            raise ConvertError(
                f"{self.path}: unreadable dist checkpoint metadata ({err})"
            ) from None
        self._objects: dict[str, Any] | None = None

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of a tensor key."""
        return tuple(self.tensors[key].global_shape)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a tensor key."""
        return self.tensors[key].dtype

    def object_keys(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """ShardedObject unique keys -> (global shape, offset), e.g. per-layer extra states."""
        if self._objects is None:
            from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

            found = load_sharded_metadata(self.path)
            self._objects = {}
            for key, value in found.items():
                if isinstance(value, ShardedObject):
                    self._objects[key] = (tuple(value.global_shape), tuple(value.global_offset))
        return self._objects

    def common(self) -> dict[str, Any]:
        """The non-sharded part (``common.pt``: optimizer param groups, scheduler, ...)."""
        return dist_checkpointing.load_common_state_dict(self.path) or {}

    def load(self, requests: list[Request]) -> dict[Request, Tensor]:
        """Load the requested pieces (collective; the result is filled on rank 0 only)."""
        sd: dict[str, ShardedTensor] = {}
        if is_writer():
            for i, r in enumerate(requests):
                meta = self.tensors[r.key]
                gshape = tuple(meta.global_shape)
                if r.layer is None:
                    data = torch.empty(gshape, dtype=meta.dtype)
                    sd[str(i)] = ShardedTensor.from_rank_offsets(r.key, data, replica_id=0)
                else:
                    data = torch.empty((1, *gshape[1:]), dtype=meta.dtype)
                    sd[str(i)] = ShardedTensor.from_rank_offsets(
                        r.key, data, (0, r.layer, gshape[0]), replica_id=0
                    )
        loaded = dist_checkpointing.load(sd, self.path, validate_access_integrity=False)
        out: dict[Request, Tensor] = {}
        if is_writer():
            for i, r in enumerate(requests):
                t = loaded[str(i)]
                out[r] = t[0] if r.layer is not None else t
        return out

    def load_objects(self, keys: list[str]) -> dict[str, Any]:
        """Load ShardedObjects by unique key (``name/shard_<offset>_<shape>``; collective)."""
        sd: dict[str, ShardedObject] = {}
        if is_writer():
            objects = self.object_keys()
            for i, unique in enumerate(keys):
                shape, offset = objects[unique]
                name = unique.rsplit("/shard_", 1)[0]
                sd[str(i)] = ShardedObject(name, None, shape, offset, replica_id=0)
        loaded = dist_checkpointing.load(sd, self.path, validate_access_integrity=False)
        return {unique: loaded[str(i)] for i, unique in enumerate(keys)} if is_writer() else {}


class DistWriter:
    """Collect global tensors (staged to disk) and write them as one dist checkpoint."""

    def __init__(self, staging_dir: str) -> None:
        self.staging_dir = staging_dir
        self.entries: dict[str, list[ShardedTensor | ShardedObject]] = {}
        self._n = 0
        self._file = None
        self._offset = 0
        self._path = os.path.join(staging_dir, "staged-tensors.bin")
        self.bytes = 0
        if is_writer():
            os.makedirs(staging_dir, exist_ok=True)
            self._file = open(self._path, "wb")

    def _stage(self, tensor: Tensor) -> Tensor:
        """Write ``tensor`` to the staging file; return a memory-mapped copy of it."""
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return t.clone()
        assert self._file is not None
        pad = -self._offset % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
        start = self._offset + pad
        self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._file.flush()
        self._offset = start + nbytes
        self.bytes += nbytes
        arr = np.memmap(self._path, dtype=np.uint8, mode="r+", offset=start, shape=(nbytes,))
        return torch.from_numpy(arr).view(t.dtype).view(t.shape)

    def add(self, key: str, tensor: Tensor, layer: int | None = None, layers: int = 0) -> None:
        """Tensor ``key`` (whole), or layer ``layer`` of ``layers`` of a layer-stacked key."""
        if not is_writer():
            return
        data = self._stage(tensor)
        if layer is None:
            sh = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
        else:
            sh = ShardedTensor.from_rank_offsets(
                key, data.unsqueeze(0), (0, layer, layers), replica_id=0
            )
        self.entries.setdefault(key, []).append(sh)

    def add_object(
        self, key: str, value: Any, shape: tuple[int, ...], offset: tuple[int, ...]
    ) -> None:
        """A ShardedObject (e.g. a layer's ``_extra_state``) at ``offset`` of ``shape``."""
        if not is_writer():
            return
        obj = ShardedObject(key, value, shape, offset, replica_id=0)
        self.entries.setdefault(obj.unique_key, []).append(obj)

    def save(self, ckpt_dir: str, common: dict[str, Any] | None = None) -> None:
        """Write everything added into ``ckpt_dir`` (collective), then drop the staging file."""
        sd: dict[str, Any] = dict(common or {})
        if is_writer():
            assert self._file is not None
            self._file.close()
            self._file = None
            os.makedirs(ckpt_dir, exist_ok=True)
            for key, shards in self.entries.items():
                for j, sh in enumerate(shards):
                    sd[f"{key}#{j}"] = sh
        barrier()
        try:
            dist_checkpointing.save(sd, ckpt_dir)
        finally:
            self.entries.clear()
            if is_writer():
                shutil.rmtree(self.staging_dir, ignore_errors=True)
        barrier()
