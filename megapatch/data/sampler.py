"""Deterministic, resumable data-parallel batch sampling (Megatron-LM's pretraining sampler).

Samples are taken in dataset order (the stream is already shuffled by document); step n's
global batch is samples ``[n*G, (n+1)*G)`` with ``G = micro_batch_size * data_parallel_size``
micro-batch-wise, and data-parallel rank r gets the r-th slice of each G. Starting at
``consumed_samples = n`` therefore yields exactly what skipping the first n samples would,
so resuming needs only the consumed-samples count of the current stage. Incomplete global
micro batches at the end are dropped, so every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megapatch.data.config import DataError


class PretrainingBatchSampler:
    """Yields this rank's index lists of ``micro_batch_size``, starting at ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataError("micro batch size and data-parallel size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"consumed samples {consumed_samples} outside [0, {total_samples}]: "
                "the checkpoint does not belong to this stage's dataset"
            )
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank, self.size = data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        """Micro batches this rank will get."""
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        mbs, g = self.micro_batch_size, self.micro_batch_size * self.size
        for step in range(len(self)):
            first = self.consumed_samples + step * g + self.rank * mbs
            yield list(range(first, first + mbs))


def build_data_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 2,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with :class:`PretrainingBatchSampler` (batches stacked)."""
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    from megapatch.runtime.signals import protected_helper_init

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        # A scheduler's SIGTERM reaches every process of the job: workers must not die under
        # the trainer while it finishes its step and saves (they die with it instead).
        worker_init_fn=protected_helper_init if num_workers else None,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
