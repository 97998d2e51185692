"""Training stages laid consecutively on one planned token stream (pure arithmetic, no I/O).

A stage with patch size K and ``tokens_per_sample_input`` L = K*T (L = T when K = 1) reads
sample i as the window ``stream[start + i*L : start + i*L + L + K]``: the first L tokens are the
input, the labels are the same window shifted by K (the next patch's tokens). Samples advance
by L, so a stage *consumes* ``[start, start + num_samples * L)``: every stream token is the
input of exactly one sample, as with Megatron's ``add_extra_token_to_sequence`` (where the one
extra token is also the next sample's first input). The last sample's labels look K tokens past
the stage's end (``read_end``); those tokens are the next stage's first inputs.

Stage i+1 starts exactly where stage i ends: no gap, no overlap of inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megapatch.data.config import DataError


@dataclass(frozen=True)
class StageSpec:
    """One training stage: patch size K, input tokens per sample (K*T) and its sample count."""

    patch_size: int
    tokens_per_sample_input: int
    num_samples: int

    def __post_init__(self) -> None:
        k, length = self.patch_size, self.tokens_per_sample_input
        if k < 1 or length < 1 or self.num_samples < 0:
            raise DataError(f"bad stage {self}: patch size and sample length must be >= 1")
        if length % k:
            raise DataError(
                f"stage sample length {length} is not a multiple of its patch size {k}; "
                "use K*T input tokens per sample"
            )

    @property
    def seq_length(self) -> int:
        """T: model positions per sample (patches, or tokens when K = 1)."""
        return self.tokens_per_sample_input // self.patch_size

    @property
    def tokens_consumed(self) -> int:
        """Stream tokens this stage consumes as inputs."""
        return self.num_samples * self.tokens_per_sample_input


@dataclass(frozen=True)
class StageWindow:
    """Where a stage sits on the stream: inputs ``[start, end)``, labels read up to ``read_end``."""

    index: int
    spec: StageSpec
    start: int
    end: int

    @property
    def read_end(self) -> int:
        """One past the last stream token any sample of the stage reads (labels included)."""
        return self.end + self.spec.patch_size if self.spec.num_samples else self.end

    def sample_start(self, i: int) -> int:
        """Stream position of sample ``i``'s first input token."""
        return self.start + i * self.spec.tokens_per_sample_input


def plan_stages(stages: Sequence[StageSpec]) -> list[StageWindow]:
    """Lay ``stages`` (in training order) consecutively on the stream, starting at 0."""
    windows, start = [], 0
    for i, spec in enumerate(stages):
        windows.append(StageWindow(i, spec, start, start + spec.tokens_consumed))
        start += spec.tokens_consumed
    return windows


def stage_specs_from_budget(
    train_tokens: int,
    patch_fraction: float,
    patch_size: int,
    seq_length: int,
    global_batch_size: int,
    patch_global_batch_size: int | None = None,
) -> list[StageSpec]:
    """The two stages of patch-level training for a budget of ``train_tokens`` input tokens.

    The patch stage takes ``floor(patch_fraction * train_tokens)`` tokens rounded down to whole
    steps of ``patch_global_batch_size`` samples of K*T tokens (default ``global_batch_size / K``,
    which keeps tokens per step constant, as in the paper); the token stage takes the rest,
    rounded down to whole steps of ``global_batch_size`` samples of T tokens. Both stages are
    always returned (either may have 0 samples).
    """
    if not 0.0 <= patch_fraction <= 1.0:
        raise DataError(f"patch fraction {patch_fraction} must lie in [0, 1]")
    if min(train_tokens, patch_size, seq_length, global_batch_size) < 1:
        raise DataError("train tokens, patch size, seq length and global batch must be >= 1")
    if patch_global_batch_size is None:
        if global_batch_size % patch_size:
            raise DataError(
                f"global batch {global_batch_size} is not divisible by patch size {patch_size}; "
                "give the patch stage's global batch explicitly"
            )
        patch_global_batch_size = global_batch_size // patch_size
    patch_step = patch_global_batch_size * patch_size * seq_length
    token_step = global_batch_size * seq_length
    patch_steps = math.floor(patch_fraction * train_tokens + 1e-6) // patch_step
    token_steps = (train_tokens - patch_steps * patch_step) // token_step
    return [
        StageSpec(patch_size, patch_size * seq_length, patch_steps * patch_global_batch_size),
        StageSpec(1, seq_length, token_steps * global_batch_size),
    ]
