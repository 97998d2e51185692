"""Damaged or mismatched dataset files are refused before any model is built.

Each case is made the way it happens: a copy cut short, an ``.idx`` from another
preprocessing run, empty files, data tokenized with a larger vocabulary and no meta.json.
The reference for "what the files hold" is megatron-core's own IndexedDataset reader.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from megapatch.data.config import DataConfig, DataError, PreprocessConfig
from megapatch.data.datasets import build_stage_datasets
from megapatch.data.integrity import check_prefix
from megapatch.data.preprocess import preprocess
from megapatch.data.stages import StageSpec
from tests.data.conftest import write_jsonl


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, spm_model):
    """A (all 79 topics) and small (the first 10 as JSONL), preprocessed as users do."""
    from megapatch.data.corpus import iter_documents, resolve_sources

    root = tmp_path_factory.mktemp("integrity")
    texts = [d.text for d in iter_documents(resolve_sources(["embedded:topics"]))]
    write_jsonl(root / "small.jsonl", [{"text": t} for t in texts[:10]])
    out = {}
    for name, inp in (("full", "embedded:topics"), ("small", str(root / "small.jsonl"))):
        cfg = PreprocessConfig(
            input=[inp], output_prefix=str(root / name), tokenizer_model=spm_model
        )
        preprocess(cfg, report=lambda msg: None)
        out[name] = str(root / name)
    return out


def _copy(src: str, dst: str, parts=(".bin", ".idx", ".meta.json")) -> str:
    for ext in parts:
        shutil.copy(src + ext, dst + ext)
    return dst


def test_a_consistent_prefix_passes_and_agrees_with_megatron(prefixes):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = check_prefix(prefixes["full"], vocab_size=512)
    ds = IndexedDataset(prefixes["full"])
    assert info["documents"] == len(ds) and info["tokens"] == int(ds.sequence_lengths.sum())
    assert info["max_token_sampled"] == max(int(ds[i].max()) for i in range(len(ds)))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("bin-short", "bytes short of what .*full.idx describes"),
        ("idx-of-smaller", "bytes longer than .*full.idx describes"),
        ("idx-of-larger", "bytes short of what"),
        ("empty-bin", "full.bin is empty"),
        ("empty-idx", "full.idx is empty"),
        ("bad-header", "not a Megatron indexed-dataset index"),
        ("idx-truncated", "full.idx is truncated"),
        ("pointers", "byte pointers do not follow its sequence lengths"),
        ("meta-mismatch", "full.meta.json records .* tokens"),
        ("vocab-no-meta", "holds token id 5\\d\\d, beyond --vocab-size 500"),
    ],
)
def test_damaged_prefixes_are_refused_naming_the_file(prefixes, tmp_path, damage, match):
    p = _copy(prefixes["full"], str(tmp_path / "full"))
    vocab = 512
    if damage == "bin-short":
        with open(p + ".bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 100)
    elif damage == "idx-of-smaller":
        shutil.copy(prefixes["small"] + ".idx", p + ".idx")
    elif damage == "idx-of-larger":
        shutil.copy(prefixes["small"] + ".bin", p + ".bin")  # the .idx now describes more
        shutil.copy(prefixes["small"] + ".meta.json", p + ".meta.json")
    elif damage == "empty-bin":
        open(p + ".bin", "w").close()
    elif damage == "empty-idx":
        open(p + ".idx", "w").close()
    elif damage == "bad-header":
        with open(p + ".idx", "r+b") as f:
            f.write(b"NOTANIDX")
    elif damage == "idx-truncated":
        with open(p + ".idx", "r+b") as f:
            f.truncate(200)
    elif damage == "pointers":  # same total size, other document boundaries
        data = bytearray(open(p + ".idx", "rb").read())
        n = struct.unpack("<Q", data[18:26])[0]
        lengths = np.frombuffer(bytes(data[34 : 34 + 4 * n]), np.int32).copy()
        lengths[0], lengths[1] = lengths[0] + 5, lengths[1] - 5
        data[34 : 34 + 4 * n] = lengths.tobytes()
        open(p + ".idx", "wb").write(bytes(data))
    elif damage == "meta-mismatch":
        shutil.copy(prefixes["small"] + ".meta.json", p + ".meta.json")
    elif damage == "vocab-no-meta":
        (tmp_path / "full.meta.json").unlink()
        vocab = 500  # the data holds ids up to 511
    with pytest.raises(DataError, match=match):
        check_prefix(p, vocab_size=vocab)


def test_every_sample_read_is_bound_checked(prefixes):
    """Beyond the sampled check: a training sample with an id >= --vocab-size is refused."""
    cfg = DataConfig(data_path=[prefixes["full"]], seq_length=64, split="90,10,0")
    built = build_stage_datasets(cfg, [StageSpec(1, 64, 200)], vocab_size=300)
    with pytest.raises(DataError, match="beyond --vocab-size 300"):
        for i in range(len(built.train[0])):
            built.train[0][i]
    ok = build_stage_datasets(cfg, [StageSpec(1, 64, 200)], vocab_size=512).train[0]
    assert all(int(ok[i]["tokens"].max()) < 512 for i in range(len(ok)))


def test_train_refuses_a_truncated_bin_in_seconds_before_the_model(prefixes, tmp_path):
    p = _copy(prefixes["full"], str(tmp_path / "cut"))
    with open(p + ".bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "megapatch.cli", "train", "--data-path", p, "--vocab-size", "512",
         "--train-tokens", "65536", "--seq-length", "64", "--global-batch-size", "16",
         "--lr-warmup-iters", "2",
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "cut.bin is 100 bytes short" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory or a model
    assert time.monotonic() - start < 60
