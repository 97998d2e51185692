"""torch.distributed + megatron-core parallel state + seeds, in one place.

NCCL when CUDA is available, gloo otherwise (then the CPU shims of :mod:`cpu_compat` are
installed first). Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK), under Slurm's srun
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT exported by the job
script) and as a single process with no launcher at all.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch

from megapatch.config import ParallelConfig
from megapatch.runtime import cpu_compat

# The layout that megatron's parallel state is initialised for: the config's own dataclass
# (tensor, pipeline, virtual pipeline sizes; data parallel is what remains of the world).
ParallelLayout = ParallelConfig


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_process_group(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed once (idempotent); returns (rank, world_size)."""
    cpu_compat.install()  # no-op with CUDA
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    store = None
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError(
                "MASTER_PORT is not set for a multi-process run: launch with torchrun, or export "
                "MASTER_ADDR and MASTER_PORT in the job script (see slurm/)"
            )
        # One process: an in-memory store, no port, and nothing left in os.environ for the
        # processes this one starts (a MASTER_PORT there would be shared by all of them).
        store = torch.distributed.HashStore()
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        store=store,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world


def initialize_model_parallel(layout: ParallelConfig) -> None:
    """(Re)initialise megatron-core's parallel state for ``layout`` on the current world."""
    from megatron.core import parallel_state

    cpu_compat.ensure_megatron_patched()
    world = torch.distributed.get_world_size()
    layout.data_parallel_size(world)  # validates
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
    )


def set_random_seeds(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    The CPU generator gets the same seed on every rank: megatron's CPU initialisation draws the
    full master weight and keeps this rank's slice, so tensor-parallel ranks agree on it.
    """
    from megatron.core import tensor_parallel

    cpu_compat.ensure_megatron_patched()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def find_free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
