"""Per-stage sample datasets on the planned token stream (the training loop's data interface).

A sample of a stage with patch size K and L = K*T input tokens, starting at stream position
``s = start + i*L``, is a dict of torch tensors, each of length L:

* ``tokens`` (int64): ``stream[s : s+L]``;
* ``labels`` (int64): ``labels[j] = stream[s + j + K]``, the tokens of the next patch
  (K = 1: the usual shift by one). Patch p's K targets are ``labels[p*K : (p+1)*K]``;
* ``loss_mask`` (float32): 1 where the label counts; 0 where it is EOD and
  ``--eod-mask-loss`` is set. (Megatron's ``eod_mask_loss`` zeroes positions whose *input*
  is EOD; here the label is what is masked.) Streams are packed and never padded;
* ``position_ids`` (int64): the patch index of each token, ``j // K`` (K = 1: ``0..T-1``), so
  ``position_ids[::K]`` are the patch positions ``0..T-1`` the model uses.

Sample order: with ``--shuffle-samples`` (the default, as Megatron's GPT datasets shuffle
samples) sample ``i`` of a stage is window ``order[i]`` of that stage, ``order`` a seeded
permutation of the stage's windows (seed, stage index and window geometry only): every stage
still reads exactly its own windows once, resuming at ``consumed_samples`` continues the same
order, and a step's global batch is the same set of windows at every data-parallel size.

The validation (and test) dataset always has token-level samples (K = 1, L = T), from the
start of its own split's stream, in stream order, so validation loss is comparable across
stages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megapatch.data.config import DataConfig, DataError
from megapatch.data.stages import StageSpec, StageWindow, plan_stages
from megapatch.data.stream import TokenStream, build_streams, parse_blend, read_meta


class StageDataset(torch.utils.data.Dataset):
    """Samples of one stage: sample ``i`` reads ``stream[start + i*L : start + i*L + L + K]``."""

    def __init__(
        self,
        stream: TokenStream | None,
        window: StageWindow,
        eod_id: int | None,
        eod_mask_loss: bool,
        order: np.ndarray | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if window.spec.num_samples and (stream is None or window.read_end > len(stream)):
            have = len(stream) if stream is not None else 0
            raise DataError(f"stage window ends at {window.read_end}, the stream has {have}")
        if eod_mask_loss and eod_id is None:
            raise DataError("--eod-mask-loss needs the EOD id: pass --tokenizer-model")
        self.stream, self.window = stream, window
        self.eod_id, self.eod_mask_loss = eod_id, eod_mask_loss
        spec = window.spec
        self.k, self.length = spec.patch_size, spec.tokens_per_sample_input
        self._positions = torch.arange(self.length) // self.k
        if order is not None and len(order) != spec.num_samples:
            raise DataError(f"sample order of {len(order)} for {spec.num_samples} samples")
        self.order = order
        self.vocab_size = vocab_size  # ids at or above it are refused as samples are read

    def __len__(self) -> int:
        return self.window.spec.num_samples

    def window_index(self, i: int) -> int:
        """Which of the stage's consecutive windows sample ``i`` is (``i`` unshuffled)."""
        return i if self.order is None else int(self.order[i])

    def sample_start(self, i: int) -> int:
        """Stream position of sample ``i``'s first input token."""
        return self.window.sample_start(self.window_index(i))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside stage {self.window.index} ({len(self)} samples)")
        start = self.sample_start(i)
        window = torch.from_numpy(self.stream.read(start, self.length + self.k))
        if self.vocab_size is not None and int(window.max()) >= self.vocab_size:
            raise DataError(
                f"token id {int(window.max())} in stream tokens [{start}, "
                f"{start + self.length + self.k}) is beyond --vocab-size {self.vocab_size}: the "
                "data was tokenized with a larger vocabulary; set --vocab-size to its size"
            )
        labels = window[self.k :]
        loss_mask = torch.ones(self.length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[labels == self.eod_id] = 0.0
        return {
            "tokens": window[: self.length],
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": self._positions.clone(),
        }


@dataclass
class StageDatasets:
    """One dataset per training stage (in order), their stream windows, valid/test datasets."""

    train: list[StageDataset | None]
    windows: list[StageWindow]
    valid: StageDataset | None
    test: StageDataset | None
    train_stream: TokenStream | None


def _eod_id(config: DataConfig) -> int | None:
    metas = read_meta(parse_blend(config.data_path)[0])
    ids = {m.get("eod_id") for m in metas if m}
    if len(ids) == 1 and None not in ids:
        return ids.pop()
    if config.tokenizer_model:
        from megapatch.data.tokenizer import Tokenizer

        return Tokenizer(config.tokenizer_model).eod
    return None


def build_stage_datasets(
    config: DataConfig,
    stages: Sequence[StageSpec],
    valid_samples: int = 0,
    test_samples: int = 0,
    is_built_on_rank: Callable[[], bool] | None = None,
    vocab_size: int | None = None,
) -> StageDatasets:
    """Lay ``stages`` consecutively on the training stream and build a dataset for each.

    ``stages`` are in training order (e.g. from ``stage_specs_from_budget``). Validation and
    test datasets hold ``valid_samples`` / ``test_samples`` token-level samples of
    ``config.seq_length`` + 1 tokens from their own splits (None when 0). Call on every rank:
    index caches are built by rank 0 first when torch.distributed is initialised. With
    ``vocab_size``, every sample read is bound-checked against it.
    """
    if config.seq_length < 1:
        raise DataError("--seq-length must be >= 1")
    windows = plan_stages(stages)
    t = config.seq_length
    evals = [StageSpec(1, t, n) for n in (valid_samples, test_samples)]
    eval_windows = [plan_stages([spec])[0] for spec in evals]
    needed = (
        max((w.read_end for w in windows), default=0),
        eval_windows[0].read_end,
        eval_windows[1].read_end,
    )
    streams = build_streams(config, needed, is_built_on_rank)
    eod = _eod_id(config)

    def make(stream: TokenStream | None, window: StageWindow, shuffle: bool) -> StageDataset | None:
        if stream is None and window.spec.num_samples:
            return None  # this rank builds no data (is_built_on_rank returned False)
        order = sample_order(config, stream, window) if shuffle else None
        return StageDataset(stream, window, eod, config.eod_mask_loss, order, vocab_size)

    valid, test = (
        make(s, w, False) if w.spec.num_samples else None for s, w in zip(streams[1:], eval_windows)
    )
    return StageDatasets(
        train=[make(streams[0], w, config.shuffle_samples) for w in windows],
        windows=windows,
        valid=valid,
        test=test,
        train_stream=streams[0],
    )


def sample_order(config: DataConfig, stream: TokenStream, window: StageWindow) -> np.ndarray:
    """The seeded permutation of a stage's windows (cached beside the stream indices).

    It depends on the seed, the stage index and the window geometry only (not on the layout),
    so every rank, and a resumed run, gets the same order. Cached as ``.npy`` in the index
    cache and memory-mapped: a 7B run's stage of tens of millions of samples is read, not
    recomputed, by every rank.
    """
    n, spec = window.spec.num_samples, window.spec
    key = [config.seed, 0x5A3F1E, window.index, window.start, spec.tokens_per_sample_input, n]

    def build() -> np.ndarray:
        order = np.random.default_rng(key).permutation(n)
        return order.astype(np.int32 if n < 2**31 else np.int64)

    cache = config.data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(parse_blend(config.data_path)[0][0])), "index-cache"
    )
    digest = getattr(stream.top, "unique_description_hash", "stream")
    path = os.path.join(cache, f"{digest}-stage-order-{'-'.join(map(str, key))}.npy")
    if not os.path.isfile(path):
        try:
            os.makedirs(cache, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, build())
            os.replace(tmp, path)  # atomic: other ranks read a whole file or build their own
        except OSError:
            return build()  # a read-only cache directory: keep the order in memory
    return np.load(path, mmap_mode="r")
