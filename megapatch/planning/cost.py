"""Step time, throughput and cost of each stage, from the project's one FLOP count.

The cost model, stated in every report:

    FLOPs per step     = flops_per_step(model, samples per step, positions per sample, V_pad)
                         (megapatch.training.flops: Megatron's count, causal attention halved;
                         in the patch stage T patch positions of B/K samples)
    compute time       = FLOPs per step / (GPUs x peak x efficiency)
    step time          = compute time / (1 - pipeline bubble)
    tokens/s/GPU       = tokens per step / step time / GPUs
    MFU                = achieved FLOP/s per GPU / peak = efficiency x (1 - bubble)
    wall time          = steps x step time;  GPU-hours = wall time x GPUs / 3600

``peak`` is the dense bf16 peak of the GPU, or its FP8 peak when the run trains in FP8 (as the
trainer's MFU does, ``megapatch.training.metrics``). ``efficiency`` is the share of that peak the
user expects the kernels to reach outside the bubble; the defaults come from published anchors
on H100: Megatron-Core's GPT 7.1B in bf16 at 47% MFU (default 0.45 in bf16) and NeMo 24.07's
Llama-2 7B in FP8 at 16,847 tokens/s/GPU = 36.5% of the FP8 peak by this FLOP count (default
0.35 in FP8). Both stages are assumed to reach the same efficiency (the patch stage runs the
same GEMM shapes: T positions per micro-batch). Not modelled: data loading (pre-tokenized,
memory-mapped), evaluation, checkpoint writes, exposed communication beyond what the
efficiency absorbs, start-up and restarts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from megapatch.config import ConfigError, RunConfig
from megapatch.training.flops import PEAK_TFLOPS, flops_per_step
from megapatch.training.plan import StagePlan

# Device memory per GPU, GiB (the figure users know the card by).
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 80.0,
    "H800": 80.0,
    "H200": 141.0,
    "GH200": 96.0,
    "A100": 80.0,
    "B200": 180.0,
}
DEFAULT_GPU = "H100"
DEFAULT_EFFICIENCY = {"bf16": 0.45, "fp8": 0.35}


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is for."""

    gpu: str
    nodes: int
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float  # dense peak for the run's precision
    precision: str  # "bf16" or "fp8" (which peak)
    efficiency: float
    efficiency_is_default: bool

    @property
    def world_size(self) -> int:
        """GPUs in all."""
        return self.nodes * self.gpus_per_node

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return dict(asdict(self), world_size=self.world_size)


def _get(args: Any, name: str, default: Any = None) -> Any:
    if args is None:
        return default
    if isinstance(args, Mapping):
        value = args.get(name, default)
    else:
        value = getattr(args, name, default)
    return default if value is None else value


def resolve_hardware(cfg: RunConfig, world_size: int, args: Any = None) -> Hardware:
    """Hardware from ``args`` (a namespace or mapping with gpu, gpu_memory_gib, efficiency,
    nodes, gpus_per_node; anything missing takes its default) for ``world_size`` GPUs."""
    gpu = str(_get(args, "gpu", DEFAULT_GPU)).upper()
    if gpu not in PEAK_TFLOPS:
        raise ConfigError(
            f"--gpu {gpu}: unknown GPU; known: {', '.join(sorted(PEAK_TFLOPS))} (dense peaks in "
            "megapatch/training/flops.py)"
        )
    fp8 = cfg.precision.fp8_format is not None
    precision = "fp8" if fp8 else "bf16"
    memory = float(_get(args, "gpu_memory_gib", GPU_MEMORY_GIB[gpu]))
    if memory <= 0:
        raise ConfigError(f"--gpu-memory-gib must be > 0, got {memory}")
    given = _get(args, "efficiency")
    efficiency = float(given) if given is not None else DEFAULT_EFFICIENCY[precision]
    if not 0.0 < efficiency <= 1.0:
        raise ConfigError(
            f"--efficiency must lie in (0, 1] (the share of the {precision} peak the run "
            f"reaches), got {efficiency}"
        )
    nodes = int(_get(args, "nodes", 1))
    per_node = int(_get(args, "gpus_per_node", world_size // max(nodes, 1) or 1))
    if nodes < 1 or per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if nodes * per_node != world_size:
        nodes, per_node = 1, world_size
    return Hardware(
        gpu=gpu,
        nodes=nodes,
        gpus_per_node=per_node,
        memory_gib=memory,
        peak_tflops=PEAK_TFLOPS[gpu][precision],
        precision=precision,
        efficiency=efficiency,
        efficiency_is_default=given is None,
    )


@dataclass(frozen=True)
class StageCost:
    """Projected time and cost of one stage."""

    flops_per_step: float
    step_seconds: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    wall_seconds: float
    gpu_hours: float
    flops: float  # whole stage

    def as_dict(self) -> dict[str, float]:
        """JSON-friendly view."""
        return asdict(self)


def stage_cost(cfg: RunConfig, stage: StagePlan, hw: Hardware) -> StageCost:
    """Step time, throughput and cost of ``stage`` on ``hw``."""
    vocab = cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
    flops = flops_per_step(cfg.model, stage.global_batch, stage.positions, vocab)
    world = hw.world_size
    achieved = hw.peak_tflops * 1e12 * hw.efficiency  # per GPU, outside the bubble
    compute = flops / (world * achieved)
    step = compute / (1.0 - stage.bubble_fraction)
    per_gpu = flops / step / world
    return StageCost(
        flops_per_step=flops,
        step_seconds=step,
        tokens_per_s_per_gpu=stage.tokens_per_step / step / world,
        tflops_per_gpu=per_gpu / 1e12,
        mfu=per_gpu / (hw.peak_tflops * 1e12),
        wall_seconds=step * stage.steps,
        gpu_hours=step * stage.steps * world / 3600.0,
        flops=flops * stage.steps,
    )


def add_hardware_arguments(parser: argparse.ArgumentParser) -> None:
    """--nodes, --gpus-per-node, --gpu, --gpu-memory-gib, --efficiency."""
    g = parser.add_argument_group("hardware", "The machine the plan is for.")
    g.add_argument("--nodes", type=int, default=1, help="Nodes (default: 1).")
    g.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8); world = N x G."
    )
    g.add_argument(
        "--gpu",
        default=DEFAULT_GPU,
        help=f"GPU model for the peak throughput: one of {', '.join(sorted(PEAK_TFLOPS))} "
        f"(default: {DEFAULT_GPU}).",
    )
    g.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="Device memory per GPU in GiB (default: the GPU's, 80 for H100).",
    )
    g.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="Share of the peak (FP8 peak when training in FP8) the kernels reach outside the "
        f"pipeline bubble (default: {DEFAULT_EFFICIENCY['bf16']} in bf16, "
        f"{DEFAULT_EFFICIENCY['fp8']} in FP8; from Megatron-Core and NeMo H100 results).",
    )
