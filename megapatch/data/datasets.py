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

The validation (and test) dataset always has token-level samples (K = 1, L = T), from the
start of its own split's stream, so validation loss is comparable across stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

    def __len__(self) -> int:
        return self.window.spec.num_samples

    def sample_start(self, i: int) -> int:
        """Stream position of sample ``i``'s first input token."""
        return self.window.sample_start(i)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside stage {self.window.index} ({len(self)} samples)")
        window = torch.from_numpy(self.stream.read(self.sample_start(i), self.length + self.k))
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
) -> StageDatasets:
    """Lay ``stages`` consecutively on the training stream and build a dataset for each.

    ``stages`` are in training order (e.g. from ``stage_specs_from_budget``). Validation and
    test datasets hold ``valid_samples`` / ``test_samples`` token-level samples of
    ``config.seq_length`` + 1 tokens from their own splits (None when 0). Call on every rank:
    index caches are built by rank 0 first when torch.distributed is initialised.
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

    def make(stream: TokenStream | None, window: StageWindow) -> StageDataset | None:
        if stream is None and window.spec.num_samples:
            return None  # this rank builds no data (is_built_on_rank returned False)
        return StageDataset(stream, window, eod, config.eod_mask_loss)

    valid, test = (
        make(s, w) if w.spec.num_samples else None for s, w in zip(streams[1:], eval_windows)
    )
    return StageDatasets(
        train=[make(streams[0], w) for w in windows],
        windows=windows,
        valid=valid,
        test=test,
        train_stream=streams[0],
    )
