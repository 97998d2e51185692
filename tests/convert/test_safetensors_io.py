"""The streaming safetensors writer/reader against the safetensors library itself."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from megapatch.convert.common import ConvertError, parse_size
from megapatch.convert.safetensors_io import (
    INDEX_NAME,
    ShardedSafetensorsWriter,
    open_hf_checkpoint,
    read_tensor,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(11, 2, generator=g).to(torch.float16),
        "d.scalar": torch.tensor(3.5),
        "e.weight": torch.randn(64, 3, generator=g),
    }


@pytest.mark.parametrize("max_bytes,files", [(10**9, 1), (100, 3)])
def test_streamed_shards_read_back_by_safetensors(tmp_path, max_bytes, files):
    tensors = _tensors()
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(str(tmp_path), plan, max_bytes)
    for n, t in tensors.items():
        w.write(n, t)
    weight_map = w.close()
    names = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(names) == files
    got = {}
    for name in names:
        got.update(st_load_file(str(tmp_path / name)))  # the reference reader
    assert got.keys() == tensors.keys()
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    if files > 1:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert index["weight_map"] == weight_map
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
    else:
        assert not (tmp_path / INDEX_NAME).exists()


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedSafetensorsWriter(str(tmp_path), [("x", (2,), torch.float32)], 10**6)
    with pytest.raises(RuntimeError, match="out of plan"):
        w.write("x", torch.zeros(3))
    with pytest.raises(RuntimeError, match="stopped before writing"):
        w.close()


def test_reader_reads_safetensors_library_files(tmp_path):
    tensors = _tensors()
    st_save_file(tensors, str(tmp_path / "model.safetensors"))
    entries = open_hf_checkpoint(str(tmp_path))
    assert entries.keys() == tensors.keys()
    for n, t in tensors.items():
        assert torch.equal(read_tensor(entries[n]), t)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(ConvertError, match="no model.safetensors"):
        open_hf_checkpoint(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConvertError, match="safe_serialization=True"):
        open_hf_checkpoint(str(tmp_path))
    st_save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ConvertError, match="model.safetensors is truncated"):
        open_hf_checkpoint(str(tmp_path))


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1000") == 1000
    with pytest.raises(ConvertError, match="--max-shard-size"):
        parse_size("lots")
