"""The config tree: small dataclasses, every field with help text and a Megatron-style flag.

Each field's metadata carries ``help`` (shown by ``--help``) and optionally ``flag`` (the
Megatron-LM flag name, derived from the field name when absent). Validation that needs only
the config happens in ``validate()`` methods and raises :class:`ConfigError` naming the field
and the fix, before anything expensive (process groups, models, data) is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value: the message names the field (as its flag) and the fix."""


def arg(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with help text (and an optional explicit flag name)."""
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (``--num-layers`` for ``num_layers``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass
class ModelConfig:
    """GPT architecture (Llama-style by default: RMSNorm, SwiGLU, RoPE, no biases)."""

    num_layers: int = arg(2, "Number of transformer layers.")
    hidden_size: int = arg(64, "Transformer hidden size.")
    ffn_hidden_size: int | None = arg(
        None, "MLP hidden size; default 4*hidden (GELU) or the Llama 8/3*hidden rule (SwiGLU)."
    )
    num_attention_heads: int = arg(4, "Number of attention heads.")
    num_query_groups: int | None = arg(
        None, "Key/value heads for grouped-query attention; default = attention heads (MHA)."
    )
    kv_channels: int | None = arg(None, "Head dimension; default hidden / heads.")
    vocab_size: int = arg(
        256, "Vocabulary size of the tokenizer (unpadded); padded for TP at build time."
    )
    make_vocab_size_divisible_by: int = arg(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size."
    )
    max_position_embeddings: int = arg(
        4096, "Maximum positions (patch positions in the patch stage); RoPE needs no table."
    )
    normalization: Literal["RMSNorm", "LayerNorm"] = arg("RMSNorm", "Normalisation layer.")
    norm_epsilon: float = arg(1e-5, "Epsilon of the normalisation layers.")
    swiglu: bool = arg(True, "SwiGLU MLP (gate and up projections) instead of GELU.")
    add_bias_linear: bool = arg(False, "Biases in the linear layers.")
    position_embedding_type: Literal["rope", "learned_absolute"] = arg(
        "rope", "Positions: RoPE (per patch index in the patch stage) or a learned table."
    )
    rotary_base: int = arg(10000, "RoPE base (rope_theta).")
    untie_embeddings_and_output_weights: bool = arg(
        True, "Separate input embedding and output layer weights (Llama); tied when false."
    )
    init_method_std: float = arg(0.02, "Standard deviation of the weight initialisation.")
    attention_dropout: float = arg(0.0, "Dropout on attention probabilities.")
    hidden_dropout: float = arg(0.0, "Dropout on hidden states.")
    qk_layernorm: bool = arg(False, "Normalise queries and keys.")
    mtp_num_layers: int | None = arg(
        None,
        "Megatron multi-token-prediction layers (an auxiliary loss, NOT patch training); "
        "incompatible with patch size > 1.",
    )

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary padded as Megatron does (multiple of divisible_by x TP)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def resolved_ffn_hidden_size(self) -> int:
        """The MLP width actually used."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return 256 * -(-int(8 * self.hidden_size / 3) // 256)
        return 4 * self.hidden_size

    def validate(self) -> None:
        """Refuse impossible architectures with the field and the fix."""
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}), or set --kv-channels"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--num-query-groups ({groups})"
            )


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel is the world size divided by TP x PP."""

    tensor_model_parallel_size: int = arg(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = arg(1, "Pipeline-parallel size (PP).")
    virtual_pipeline_model_parallel_size: int | None = arg(
        None, "Model chunks per pipeline rank (interleaved 1F1B); None = no interleaving."
    )
    sequence_parallel: bool = arg(
        False, "Sequence parallelism over the TP group (norms/dropout sharded along sequence)."
    )

    def validate(self, model: ModelConfig | None = None) -> None:
        """Refuse layouts that cannot work, naming the flag and the fix."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError(
                "--tensor-model-parallel-size and --pipeline-model-parallel-size >= 1"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards the "
                "sequence over the TP group); drop the flag or raise TP"
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or pp < 2):
            raise ConfigError(
                "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2 "
                "and a value >= 1"
            )
        if model is None:
            return
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size ({tp}) must divide --num-attention-heads "
                f"({model.num_attention_heads})"
            )
        groups = model.num_query_groups or model.num_attention_heads
        if groups % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size ({tp}) must divide --num-query-groups ({groups})"
            )
        chunks = pp * (vpp or 1)
        if model.num_layers % chunks:
            raise ConfigError(
                f"--num-layers ({model.num_layers}) must be divisible by pipeline stages x "
                f"virtual chunks ({pp} x {vpp or 1})"
            )


@dataclass
class PrecisionConfig:
    """Numerics: parameter/compute dtype and FP8 through Transformer Engine."""

    bf16: bool = arg(False, "Train in bf16 (mixed precision with fp32 master weights).")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = arg(
        "auto",
        "Layer implementation: Transformer Engine when importable ('auto'), or megatron-core's "
        "local layers.",
    )
    fp8_format: Literal["e4m3", "hybrid"] | None = arg(
        None, "FP8 format for the transformer layers (needs Transformer Engine)."
    )
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = arg(
        "delayed", "FP8 scaling recipe."
    )
    fp8_margin: int = arg(0, "Margin for the FP8 scaling factor.")
    fp8_amax_history_len: int = arg(1024, "Amax history length (delayed scaling).")
    fp8_amax_compute_algo: Literal["most_recent", "max"] = arg(
        "max", "How the amax is computed from its history (delayed scaling)."
    )
    first_last_layers_bf16: bool = arg(
        False, "Keep the first and last transformer layers in bf16 under FP8."
    )
    num_layers_at_start_in_bf16: int = arg(1, "Layers at the start kept in bf16.")
    num_layers_at_end_in_bf16: int = arg(1, "Layers at the end kept in bf16.")

    def validate(self) -> None:
        """FP8 asks for bf16 and Transformer Engine; refuse otherwise with the fix."""
        if self.fp8_format is None:
            return
        if self.transformer_impl == "local":
            raise ConfigError(
                "--fp8-format needs --transformer-impl transformer_engine (megatron-core's local "
                "layers have no FP8 path)"
            )
        if not self.bf16:
            raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 elsewhere)")
