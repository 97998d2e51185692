"""Is a dataset prefix what it says it is? Cheap checks before any model is built.

A Megatron indexed dataset is two files that must agree: ``PREFIX.idx`` (header, dtype,
sequence lengths and byte pointers) and ``PREFIX.bin`` (the tokens); ``PREFIX.meta.json``
(written by ``megapatch preprocess``) records the token and document counts and the tokenizer.
A truncated or padded ``.bin``, an ``.idx`` of another dataset, empty files, or tokens beyond
the model's vocabulary otherwise train silently on wrong slices or fail at step 1 with a
numpy or embedding traceback, after minutes of model building. Checked here, in O(documents):

* the ``.idx`` header, version and dtype; its size against the counts it declares;
* the ``.bin`` size against the last pointer + length (short: truncated; long: the ``.idx``
  describes a smaller dataset), and every pointer against the running sum of lengths;
* ``meta.json``'s token and document counts against the ``.idx``;
* token ids: ``meta.json``'s vocabulary, else a strided sample of the ``.bin`` (up to 4 M
  tokens), against the model's; the training datasets also bound-check every sample they read.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from megapatch.data.config import DataError

_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's IndexedDataset index header
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_SAMPLE_TOKENS = 1 << 22


def check_prefix(prefix: str, vocab_size: int | None = None) -> dict:
    """Raise DataError naming the file and the fix when ``prefix`` is inconsistent; return
    ``{"documents", "tokens", "dtype", "max_token_sampled"}``."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    redo = f"re-run megapatch preprocess --output-prefix {prefix} --force"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; {redo}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty; {redo}")
    with open(idx_path, "rb") as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DataError(f"{idx_path} is not a Megatron indexed-dataset index (bad header); {redo}")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    count, doc_count = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
    dtype = np.dtype(_DTYPES[code])
    want_idx = 34 + 4 * count + 8 * count + 8 * doc_count
    if os.path.getsize(idx_path) < want_idx:
        raise DataError(
            f"{idx_path} is truncated: {os.path.getsize(idx_path)} bytes, its header declares "
            f"{count} sequences ({want_idx} bytes); {redo}"
        )
    lengths = np.fromfile(idx_path, np.int32, count, offset=34).astype(np.int64)
    pointers = np.fromfile(idx_path, np.int64, count, offset=34 + 4 * count)
    if count == 0 or int(lengths.sum()) == 0:
        raise DataError(f"{prefix} holds no tokens ({count} sequences); {redo}")
    expected = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize
    if (lengths < 0).any() or not np.array_equal(pointers, expected):
        raise DataError(
            f"{idx_path} is inconsistent: its byte pointers do not follow its sequence lengths "
            f"(a damaged or foreign index); {redo}"
        )
    want_bin = int(pointers[-1] + lengths[-1] * dtype.itemsize)
    have_bin = os.path.getsize(bin_path)
    if have_bin != want_bin:
        if have_bin < want_bin:
            why = f"{want_bin - have_bin:,} bytes short of what {idx_path} describes (truncated)"
        else:
            why = (
                f"{have_bin - want_bin:,} bytes longer than {idx_path} describes (the .idx "
                "belongs to a smaller dataset, or the .bin to another)"
            )
        raise DataError(f"{bin_path} is {why}; {redo}")
    tokens = int(lengths.sum())
    meta_path = prefix + ".meta.json"
    meta = {}
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{meta_path} is not valid JSON ({err}); {redo}") from None
        for key, have in (("tokens", tokens), ("documents", count)):
            if key in meta and meta[key] != have:
                raise DataError(
                    f"{meta_path} records {meta[key]:,} {key}, {idx_path} holds {have:,}: the "
                    f"files come from different runs; {redo}"
                )
    max_sampled = _max_token_sampled(bin_path, dtype, tokens)
    if vocab_size is not None:
        vocab = meta.get("vocab_size")
        if vocab is not None and vocab > vocab_size:
            raise DataError(
                f"--vocab-size ({vocab_size}) is smaller than the tokenizer of {prefix} ({vocab} "
                f"pieces); set --vocab-size {vocab}"
            )
        if max_sampled >= vocab_size:
            raise DataError(
                f"{bin_path} holds token id {max_sampled}, beyond --vocab-size {vocab_size} "
                "(tokenized with a larger vocabulary?); set --vocab-size to the tokenizer's size"
            )
    return dict(documents=count, tokens=tokens, dtype=dtype.name, max_token_sampled=max_sampled)


def _max_token_sampled(bin_path: str, dtype: np.dtype, tokens: int) -> int:
    """The largest id in the whole ``.bin`` when small, else in 64 evenly spaced slices."""
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,))
    if tokens <= _SAMPLE_TOKENS:
        return int(data.max())
    step, width = tokens // 64, _SAMPLE_TOKENS // 64
    return int(max(data[i * step : i * step + width].max() for i in range(64)))
