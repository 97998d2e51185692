"""Layer specs and precision: Transformer Engine (with FP8) when available, local otherwise.

The TE spec is what clusters run (NGC containers ship TE and apex); the local spec runs
anywhere, including CPU. The only change to megatron-core's local spec is the norm:
:class:`TorchNorm` tags its parameters for sequence parallelism so ``finalize_model_grads``
all-reduces their gradients over the TP group (megatron's ``WrappedTorchNorm`` refuses SP).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megapatch.config import ConfigError, PrecisionConfig

FP8_ALIGNMENT = 16  # FP8 GEMMs need the token dimension to be a multiple of 16.


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def use_transformer_engine(precision: PrecisionConfig) -> bool:
    """Resolve ``--transformer-impl`` against what is installed; refuse FP8 without TE."""
    have_te = transformer_engine_available()
    if precision.transformer_impl == "transformer_engine" and not have_te:
        raise ConfigError(
            "--transformer-impl transformer_engine was asked for, but transformer_engine does not "
            "import here; install it (pip install 'megapatch[gpu]', or use an NGC PyTorch "
            "container) or use --transformer-impl local"
        )
    if precision.fp8_format is not None and not have_te:
        raise ConfigError(
            f"--fp8-format {precision.fp8_format} needs Transformer Engine, which does not import "
            "here; install it (pip install 'megapatch[gpu]', or use an NGC PyTorch container) or "
            "drop --fp8-format"
        )
    if precision.transformer_impl == "local":
        return False
    return have_te


class TorchNorm:
    """torch RMSNorm/LayerNorm whose parameters are marked for sequence parallelism."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **_: object,
    ) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ConfigError(f"--normalization {config.normalization} is not supported locally")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


INIT_SEED: list[int | None] = [None]  # set by model.gpt.build_model while it builds


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer that reseeds the generator from its global layer number first.

    With CPU initialisation (megatron draws each full weight, then keeps this rank's slice),
    this makes the initial weights independent of the TP/PP/VPP layout: a layer is drawn from
    the same generator state whichever stage builds it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: object,
        layer_number: int = 1,
        *args: object,
        **kwargs: object,
    ) -> None:
        if INIT_SEED[0] is not None:
            # layer_number is local to this pipeline chunk; seed by the global one.
            from megatron.core import parallel_state
            from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

            vp_stage = kwargs.get("vp_stage")
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
            torch.manual_seed(INIT_SEED[0] + 1000 * (layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def _seeded(layer: ModuleSpec) -> ModuleSpec:
    if layer.module is TransformerLayer:
        return dataclasses.replace(layer, module=SeededTransformerLayer)
    return layer


def local_block_spec(config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec:
    """megatron-core's local GPT layer spec with SP-capable torch norms, as a block spec."""
    layer = get_gpt_layer_local_spec(
        normalization=config.normalization, qk_layernorm=config.qk_layernorm
    )
    sub = dataclasses.replace(
        layer.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm
    )
    layer = _seeded(dataclasses.replace(layer, submodules=sub))
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=TorchNorm),
    )


def block_spec(
    config: TransformerConfig, precision: PrecisionConfig, vp_stage: int | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder block spec for this config: TE when resolved so, local otherwise."""
    if use_transformer_engine(precision):
        spec = get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=True,
            normalization=config.normalization,
            vp_stage=vp_stage,
        )
        return dataclasses.replace(spec, layer_specs=[_seeded(s) for s in spec.layer_specs])
    return local_block_spec(config, vp_stage=vp_stage)


def check_fp8_positions(config: TransformerConfig, positions_per_microbatch: int) -> None:
    """Under FP8, the positions each GEMM sees (per TP rank with SP) must be a multiple of 16."""
    if not config.fp8:
        return
    per_rank = positions_per_microbatch
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel:
        per_rank = positions_per_microbatch // tp
    if positions_per_microbatch % (tp if config.sequence_parallel else 1) or (
        per_rank % FP8_ALIGNMENT
    ):
        where = " per TP rank (sequence parallel)" if config.sequence_parallel else ""
        raise ConfigError(
            f"FP8 needs the number of positions per micro-batch{where} to be a multiple of "
            f"{FP8_ALIGNMENT}, got {per_rank} ({positions_per_microbatch} positions"
            f"{f' / TP {tp}' if config.sequence_parallel else ''}); in the patch stage positions "
            "are patches (tokens / patch size): adjust --seq-length or the patch size"
        )
