"""CPU compatibility shims for megatron-core 0.16.1 (active ONLY when CUDA is unavailable).

megatron-core assumes a GPU in a handful of places (listed below). On a CPU-only machine, with
gloo as the collective backend, these shims let the unmodified library run tensor, sequence,
pipeline and data parallelism, the distributed optimizer and dist checkpointing, so the whole
project can be developed and tested without a GPU. On a machine with CUDA, :func:`install` does
nothing at all.

What is shimmed, and why:

1. RNG (``tensor_parallel/random.py``): the model-parallel RNG tracker stores CUDA generator
   states. :class:`CpuRNGStatesTracker` keeps the same API over the CPU generator, and the
   module-level CUDA state getters/setters (used by activation recompute) read the CPU state.
2. ``torch.cuda.current_device()`` / ``synchronize()`` / ``current_stream()`` and friends are
   called unconditionally (p2p communication, layers, grad buffers): they become CPU no-ops.
3. Hard-coded ``device="cuda"`` in factory calls (schedules, causal masks, grad clipping, dist
   checkpoint exchange), ``Tensor.cuda()`` (tied embeddings with PP>1) and ``param.type() ==
   'torch.cuda.FloatTensor'`` checks (optimizer, grad clipping): torch's factory functions map
   CUDA devices to CPU, ``Tensor.cuda()`` is the identity and tensors report CUDA type names.

The shims were written against one megatron-core release; any other version is refused with a
clear error, because the list above is version specific.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

SUPPORTED_MCORE_VERSION = "0.16.1"

_installed = False
_lock = threading.Lock()


def cuda_available() -> bool:
    """True when a usable CUDA device is present (then no shim is ever installed)."""
    return torch.cuda.is_available()


def check_mcore_version(version: str | None = None) -> None:
    """Refuse a megatron-core version these shims were not written for."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("megatron-core")
        except PackageNotFoundError as err:
            raise RuntimeError(
                f"megatron-core is not installed: pip install megatron-core=="
                f"{SUPPORTED_MCORE_VERSION}"
            ) from err
    if version != SUPPORTED_MCORE_VERSION:
        raise RuntimeError(
            f"megapatch's CPU compatibility shims were written for megatron-core "
            f"{SUPPORTED_MCORE_VERSION}, but megatron-core {version} is installed. "
            f"Install the pinned version: pip install megatron-core=={SUPPORTED_MCORE_VERSION}"
        )


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int means a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "linspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand_like",
    "randn_like",
    "empty_strided",
)
_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _cpu_device(fn: Any) -> Any:
    """Wrap a factory so that a CUDA ``device=`` argument means CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_factories() -> None:
    """Map CUDA devices to CPU in factories; ``.cuda()`` is the identity; CUDA type names.

    Plain attribute patches rather than a TorchFunctionMode: a mode is disabled while its own
    handler runs, so it would not see the code that ``autograd.backward`` runs.

    ``with torch.device("meta")`` (used by transformers' ``from_pretrained`` and for shape-only
    models) recognises factories by identity in a cached set; it is filled with the ORIGINAL
    functions before they are replaced, so the wrappers (which call the originals) keep
    working under a device context.
    """
    import torch.utils._device

    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _cpu_device(getattr(torch.Tensor, name)))

    tensor_to = torch.Tensor.to
    tensor_type = torch.Tensor.type

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return tensor_to(self, *args, **kwargs)

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return _CPU_TO_CUDA_TYPE.get(name, name)

    torch.Tensor.to = to
    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self


class CpuRNGStatesTracker:
    """Megatron's model-parallel RNG tracker API over the CPU generator."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        """Whether a state was added or set."""
        return self._is_initialized

    def reset(self) -> None:
        """Drop every tracked state."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A shallow copy of the tracked states."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the tracked states."""
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with ``seed`` under ``name``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        """Run the block with the CPU generator set to the tracked state ``name``."""
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _NullStream:
    """Stands in for a CUDA stream on CPU: every operation is synchronous already."""

    def synchronize(self) -> None:
        return None

    def wait_stream(self, _stream: Any) -> None:
        return None

    def wait_event(self, _event: Any) -> None:
        return None

    def record_event(self, _event: Any = None) -> None:
        return None

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL_STREAM = _NullStream()


def _patch_torch_cuda() -> None:
    # Each replacement must be a distinct function object: torch.compile keys rules by object.
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.default_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.set_device = lambda *a, **k: None


_rng_patched = False


def _patch_megatron_rng() -> None:
    global _rng_patched
    if _rng_patched:
        return
    from megatron.core.tensor_parallel import random as mrandom

    def initialize_rng_tracker(*_: Any, force_reset: bool = False, **__: Any) -> None:
        if force_reset or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    initialize_rng_tracker(force_reset=True)
    _rng_patched = True


def ensure_megatron_patched() -> None:
    """Patch megatron's RNG tracker (no-op with CUDA). Called before megatron state is set up.

    Kept apart from :func:`install` because importing megatron-core costs seconds, which
    processes that never touch it (harness workers, data workers) should not pay.
    """
    if _installed:
        _patch_megatron_rng()


def install() -> bool:
    """Install the shims if (and only if) CUDA is unavailable. Idempotent.

    Returns True when the shims are active in this process.
    """
    global _installed
    if cuda_available():
        return False
    with _lock:
        if _installed:
            return True
        check_mcore_version()
        _patch_torch_cuda()
        _patch_tensor_factories()
        _installed = True
    if "megatron.core" in sys.modules:
        _patch_megatron_rng()
    return True


def installed() -> bool:
    """Whether the shims are active in this process."""
    return _installed
