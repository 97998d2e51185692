"""Session fixtures shared by the test packages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed (1 gloo rank) + megatron parallel state TP1/PP1 in this process.

    Installs the CPU shims (only without CUDA). Tests that change the layout must restore it.
    """
    from megapatch.runtime import distributed as D

    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    yield
