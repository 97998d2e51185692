"""The planned token stream of a split, built with megatron-core's dataset machinery.

Stream of one prefix and split (train/valid/test as megatron splits documents, in index order):
epoch e is a permutation of the split's documents drawn from ``seed`` (the train split; a fixed
seed for the held-out splits, so every run of a study is scored on the same tokens), the split
and ``e`` only (so the stream does not depend on how much of it is requested); epochs follow
each other without a break. Documents end in EOD (written by ``megapatch preprocess``), so the
stream is a packed concatenation of whole documents. Megatron's C++ ``build_sample_idx`` cuts
it into chunks of ``--stream-chunk-length`` tokens with no extra token (samples are shuffled
per stage later, :mod:`.datasets`);
:class:`DocumentStreamDataset` is the mid-level ``MegatronDataset`` serving those chunks.

Several prefixes: ``BlendedMegatronDatasetBuilder`` builds one such stream per prefix and a
``BlendedDataset`` interleaves their chunks by weight (chunk c comes from the prefix furthest
below its share), so the blended stream is chunk c of the blend at ``[c*C, (c+1)*C)``. Weights
default to the prefixes' token counts. A budget larger than the data simply reads further
epochs: every epoch is a fresh permutation, so stages split the token budget, not the
document set (the paper's multi-epoch variant).

Index caches: ``--data-cache-path``; megatron's builder lets rank 0 build them first while
the other ranks wait on a barrier when torch.distributed is initialised, and later runs reuse
them (files are keyed by megatron's hash of the dataset description).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megapatch.data.config import DataConfig, DataError

with warnings.catch_warnings():  # importing megatron.core warns that TE/apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        BlendedMegatronDatasetConfig,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.megatron_dataset import MegatronDataset
    from megatron.core.datasets.utils import Split, get_blend_from_list


HELD_OUT_SEED = 1234  # document order of the valid/test splits (independent of --seed)


@dataclass
class StreamConfig(BlendedMegatronDatasetConfig):
    """Megatron's blend config plus where :class:`DocumentStreamDataset` caches its indices.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache
    miss even when torch.distributed is not initialised, so its own ``path_to_cache`` is only
    set in distributed runs; single-process runs rebuild the (cheap, C++) blend index in memory.
    """

    index_cache_path: str | None = None
    held_out_seed: int = HELD_OUT_SEED  # document order of the valid/test splits


class DocumentStreamDataset(MegatronDataset):
    """One prefix's split as a document-shuffled token stream served in fixed-length chunks."""

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str | None,
        indexed_indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: StreamConfig,
    ) -> None:
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )
        self.chunk = config.sequence_length
        self.sizes = indexed_dataset.sequence_lengths
        self.tokens_per_epoch = (
            int(self.sizes[indexed_indices].sum()) if len(indexed_indices) else 0
        )
        chunks = self.tokens_per_epoch // self.chunk if num_samples is None else num_samples
        if chunks and not self.tokens_per_epoch:
            raise DataError(
                f"the {index_split.name} split of {dataset_path} has no documents "
                f"({len(self.sizes)} in all, --split {config.split}); change --split or add data"
            )
        self.num_epochs = math.ceil(chunks * self.chunk / self.tokens_per_epoch) if chunks else 0
        self.document_index, self.sample_index = self._load_or_build()

    @staticmethod
    def _key_config_attributes() -> list[str]:
        """Megatron's cache key, plus the held-out splits' seed (caches of either order never
        mix)."""
        return [*MegatronDataset._key_config_attributes(), "held_out_seed"]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        """Documents (one sequence each) are what the train/valid/test split divides."""
        return low_level_dataset.sequence_lengths.shape[0]

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: StreamConfig) -> IndexedDataset:
        """The memory-mapped indexed dataset at ``dataset_path``."""
        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return {"text": self.read_chunk(idx, 0, self.chunk)}

    def read_chunk(self, idx: int, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of chunk ``idx``."""
        k, pos = (int(v) for v in self.sample_index[idx])
        pos += offset
        pieces = []
        while length > 0:
            doc = int(self.document_index[k])
            size = int(self.sizes[doc])
            if pos < size:
                take = min(size - pos, length)
                pieces.append(self.dataset.get(doc, offset=pos, length=take))
                length, pos = length - take, 0
            else:
                pos -= size
            k += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        # The held-out splits keep one document order whatever --seed is: runs that differ
        # only in their seed (initialisation, training order) are scored on the same tokens.
        seed = (
            self.config.random_seed
            if self.index_split == Split.train
            else self.config.held_out_seed
        )
        epochs = [
            np.random.default_rng([seed, self.index_split.value, e]).permutation(self.indices)
            for e in range(self.num_epochs)
        ]
        document_index = np.concatenate(epochs or [np.zeros(0)]).astype(np.int32)
        if not self.num_epochs:
            return document_index, np.zeros((1, 2), np.int32)
        sample_index = helpers.build_sample_idx(
            np.ascontiguousarray(self.sizes, dtype=np.int32),
            document_index,
            self.chunk,
            self.num_epochs,
            self.tokens_per_epoch,
            True,  # drop the last partial chunk
            False,  # no extra token: chunks tile the stream exactly
        )
        return document_index, sample_index

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray]:
        cache = self.config.index_cache_path
        if not cache:
            return self._build()
        base = os.path.join(
            cache, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        )
        paths = [f"{base}-document_index.npy", f"{base}-sample_index.npy"]
        if not all(map(os.path.isfile, paths)):
            os.makedirs(cache, exist_ok=True)
            for path, array in zip(paths, self._build()):
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, path)  # atomic: readers never see half a file
            with open(f"{base}-description.txt", "w") as f:
                f.write(self.unique_description)
        return tuple(np.load(p, mmap_mode="r") for p in paths)


class TokenStream:
    """Random access to a split's planned stream: ``read(start, n)`` = stream[start:start+n]."""

    def __init__(self, top: MegatronDataset | BlendedDataset, chunk_length: int) -> None:
        self.top, self.chunk = top, chunk_length
        blended = isinstance(top, BlendedDataset)
        self.datasets = top.datasets if blended else [top]
        self._which = top.dataset_index if blended else None
        self._index = top.dataset_sample_index if blended else None

    def __len__(self) -> int:
        """Tokens available in the built index (at least what was requested)."""
        return len(self.top) * self.chunk

    def read(self, start: int, length: int) -> np.ndarray:
        """Stream tokens ``[start, start + length)`` as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"stream range [{start}, {start + length}) beyond {len(self)} tokens")
        pieces = []
        while length > 0:
            c, off = divmod(start, self.chunk)
            take = min(self.chunk - off, length)
            if self._which is None:
                pieces.append(self.datasets[0].read_chunk(c, off, take))
            else:
                ds = self.datasets[int(self._which[c])]
                pieces.append(ds.read_chunk(int(self._index[c]), off, take))
            start, length = start + take, length - take
        return np.concatenate(pieces).astype(np.int64)


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's ``--data-path`` list: ``PREFIX ...`` or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    if not data_path:
        raise DataError("no --data-path given; run megapatch preprocess and pass its prefix")
    prefixes, weights = get_blend_from_list(list(data_path))
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise DataError(
                f"data prefix {prefix} not found (needs {prefix}.bin and {prefix}.idx); "
                f"run megapatch preprocess --output-prefix {prefix}"
            )
    if weights is not None and min(weights) <= 0:
        raise DataError(f"--data-path weights must be > 0, got {weights}")
    return prefixes, weights


def read_meta(prefixes: list[str]) -> list[dict]:
    """The PREFIX.meta.json of each prefix ({} if absent); refuses mixed tokenizers."""
    metas = []
    for prefix in prefixes:
        path = prefix + ".meta.json"
        metas.append(json.load(open(path)) if os.path.isfile(path) else {})
    hashes = {m["tokenizer_sha256"] for m in metas if "tokenizer_sha256" in m}
    if len(hashes) > 1:
        raise DataError(
            f"the --data-path prefixes {', '.join(prefixes)} were tokenized with different "
            "tokenizers; preprocess them all with the same --tokenizer-model"
        )
    return metas


def _token_count(prefix: str) -> int:
    # Keep the dataset referenced while reading: its __del__ closes the memory map under any
    # array still viewing it (``IndexedDataset(p).sequence_lengths.sum()`` would segfault).
    dataset = IndexedDataset(prefix)
    return int(dataset.sequence_lengths.sum())


def build_streams(
    config: DataConfig,
    tokens_per_split: tuple[int, int, int],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> list[TokenStream | None]:
    """Train/valid/test streams holding at least ``tokens_per_split`` tokens each (None: 0)."""
    prefixes, weights = parse_blend(config.data_path)
    read_meta(prefixes)
    if config.stream_chunk_length < 2:
        raise DataError("--stream-chunk-length must be >= 2")
    if weights is None and len(prefixes) > 1:
        weights = [float(_token_count(p)) for p in prefixes]
    cache = config.data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(prefixes[0])), "index-cache"
    )
    stream_config = StreamConfig(
        random_seed=config.seed,
        sequence_length=config.stream_chunk_length,
        blend=(prefixes, weights),
        split=config.split,
        path_to_cache=cache if torch.distributed.is_initialized() else None,
        index_cache_path=cache,
    )
    chunks = [math.ceil(t / config.stream_chunk_length) for t in tokens_per_split]
    for split, n in zip(Split, chunks):
        if n and stream_config.split_matrix[split.value] is None:
            raise DataError(
                f"{split.name} samples requested but --split {config.split} gives the "
                f"{split.name} split no documents; change --split"
            )
    builder = BlendedMegatronDatasetBuilder(
        DocumentStreamDataset, chunks, is_built_on_rank or (lambda: True), stream_config
    )
    tops = builder.build()
    return [
        TokenStream(top, config.stream_chunk_length) if top is not None and n else None
        for top, n in zip(tops, chunks)
    ]
