"""The config tree: small dataclasses, every field with help text and a Megatron-style flag.

Each field's metadata carries ``help`` (shown by ``--help``) and optionally ``flag`` (the
Megatron-LM flag name, derived from the field name when absent). Validation that needs only
the config happens in ``validate()`` methods and raises :class:`ConfigError` naming the field
and the fix, before anything expensive (process groups, models, data) is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from megapatch.data.config import DataConfig
from megapatch.fields import (  # noqa: F401 - re-exported: the config API in one place
    ConfigError,
    add_arguments,
    arg,
    coerce_field,
    flag_name,
    from_args,
)


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

    def data_parallel_size(self, world_size: int) -> int:
        """DP size on ``world_size`` ranks, or a clear error when the layout does not fit."""
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if mp < 1 or world_size % mp:
            raise ConfigError(
                f"{world_size} rank(s) are not divisible by --tensor-model-parallel-size "
                f"({self.tensor_model_parallel_size}) x --pipeline-model-parallel-size "
                f"({self.pipeline_model_parallel_size}); change the layout or the number of ranks"
            )
        return world_size // mp

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


@dataclass
class StagesConfig:
    """Patch-level training: the patch stage (K, λ) then token level, same weights."""

    patch_size: int = arg(4, "K: tokens per patch in the patch stage (1 = no patch stage).")
    patch_fraction: float = arg(
        2 / 3, "λ: share of the token budget trained at patch level (the rest at token level)."
    )
    patch_context: Literal["KT", "T"] = arg(
        "KT",
        "Patch-stage samples: 'KT' = K*T tokens (T patches) with B/K samples per step (the "
        "paper's choice); 'T' = T tokens (T/K patches) with B samples per step.",
    )
    stage_boundary: Literal["reset", "continue"] = arg(
        "reset",
        "At the switch to token level: 'reset' = new optimizer state and a new LR schedule with "
        "warmup (the paper's recipe); 'continue' = keep both across the switch.",
    )


@dataclass
class TrainingConfig:
    """Budget, batch shape, evaluation and exit conditions."""

    train_tokens: int = arg(
        1_048_576, "Token budget of the whole run (both stages), in input tokens."
    )
    global_batch_size: int = arg(
        32,
        "B: samples of T tokens per step in the token stage; the patch stage keeps the tokens "
        "per step equal (B/K samples of K*T tokens by default).",
    )
    micro_batch_size: int = arg(
        4, "Samples per micro-batch (in the patch stage: samples of T patch positions)."
    )
    eval_interval: int = arg(
        50, "Steps between validations (token-level loss; also patch-level in the patch stage)."
    )
    eval_samples: int = arg(64, "Validation samples (token level, T+1 tokens) per validation.")
    log_interval: int = arg(10, "Steps between metric lines.")
    exit_duration_in_mins: float | None = arg(
        None, "Save a checkpoint and exit cleanly after this many minutes (Slurm time limits)."
    )
    exit_interval: int | None = arg(
        None, "Save a checkpoint and exit after this many steps (the run resumes later)."
    )
    exit_signal_handler: bool = arg(
        True, "On SIGTERM/SIGUSR1 (Slurm pre-emption): save a checkpoint and exit cleanly."
    )
    check_for_nan_in_loss_and_grad: bool = arg(
        True,
        "Check every step's loss and gradient norm for NaN/Inf before the update is applied "
        "(a non-finite step never changes the weights; see --nonfinite-action).",
    )
    nonfinite_action: Literal["skip", "stop"] = arg(
        "skip",
        "A step with a non-finite loss or gradient norm: 'skip' its update (the data is "
        "consumed, as Megatron skips overflowed steps) or 'stop' the run (exit code 1).",
    )
    max_nonfinite_steps: int = arg(
        10, "Consecutive skipped non-finite steps after which the run stops (exit code 1)."
    )
    recompute_granularity: Literal["full", "selective"] | None = arg(
        None, "Activation recomputation: 'selective' (attention core) or 'full' layers."
    )
    recompute_method: Literal["uniform", "block"] | None = arg(
        None, "With full recompute: how layers are grouped ('uniform' or 'block')."
    )
    recompute_num_layers: int | None = arg(
        None, "With full recompute: layers per group (uniform) or recomputed layers (block)."
    )


@dataclass
class OptimizerSettings:
    """AdamW through megatron-core's optimizer, with megatron's LR/WD scheduler."""

    lr: float = arg(3e-4, "Peak learning rate.")
    min_lr: float = arg(3e-5, "Learning rate at the end of the decay.")
    lr_warmup_iters: int = arg(
        2000, "Warmup steps (per stage with --stage-boundary reset, else once)."
    )
    lr_decay_style: Literal["cosine", "linear", "constant"] = arg("cosine", "LR decay shape.")
    weight_decay: float = arg(0.1, "Decoupled weight decay (not on biases and norms).")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.95, "Adam beta2.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    clip_grad: float = arg(1.0, "Gradient clipping by global norm (0 = off).")
    use_distributed_optimizer: bool = arg(
        False, "Shard optimizer state over data-parallel ranks (ZeRO-1)."
    )
    overlap_grad_reduce: bool = arg(False, "Overlap the gradient reduce with the backward pass.")
    overlap_param_gather: bool = arg(
        False, "Overlap the parameter all-gather with the forward pass (distributed optimizer)."
    )


@dataclass
class CheckpointConfig:
    """megatron dist checkpoints: periodic, at the stage boundary, on signals; resumable."""

    save: str | None = arg(None, "Checkpoint root; default RUN_DIR/checkpoints.")
    save_interval: int | None = arg(
        None, "Steps between checkpoints (the stage boundary and exits always save)."
    )
    keep_last: int | None = arg(None, "Keep only the newest N checkpoints.")
    load: str | None = arg(
        None,
        "Initialise the weights from this checkpoint (e.g. an imported HF Llama); optimizer and "
        "schedule start fresh. Resuming needs no flag: the latest checkpoint under --save is "
        "taken automatically.",
    )
    no_save: bool = arg(False, "Write no checkpoint at all (benchmarks, smoke runs).")
    replan: bool = arg(
        False,
        "Resume with another plan (--train-tokens, --patch-fraction, --patch-size, "
        "--seq-length, --global-batch-size, --patch-context): the remaining tokens are planned "
        "afresh from the exact stream position reached (the stages done stay as they ran; new "
        "stages start as after a stage switch). Without it such a resume is refused.",
    )


@dataclass
class LoggingConfig:
    """Where metrics go: stdout, RUN_DIR/metrics.jsonl, TensorBoard, a PNG at the end."""

    tensorboard: bool = arg(True, "Write TensorBoard events to RUN_DIR/tensorboard.")
    progress: Literal["auto", "on", "off"] = arg(
        "auto", "Progress bar: 'auto' = only when stderr is a terminal."
    )
    plot: bool = arg(True, "Write RUN_DIR/val_loss.png (validation loss vs tokens and FLOPs).")


@dataclass
class RunConfig:
    """Everything one run needs; saved, fully resolved, as RUN_DIR/config.yaml."""

    run_dir: str = arg("runs/default", "Run directory: config, metrics, checkpoints, plots.")
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


# YAML section name -> dataclass (the order of --help).
SECTIONS: dict[str, type] = dict(
    model=ModelConfig,
    parallel=ParallelConfig,
    precision=PrecisionConfig,
    data=DataConfig,
    training=TrainingConfig,
    stages=StagesConfig,
    optimizer=OptimizerSettings,
    checkpoint=CheckpointConfig,
    logging=LoggingConfig,
)

# Data fields that the training run owns or derives.
_DATA_SKIP = ("tokenizer_model",)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from nested sections. Unknown sections or keys are refused; every
    value is typed by its field's declaration (YAML's ``3e-3`` is a string: read as 0.003),
    or refused naming ``section.key`` and the type it needs."""
    cfg = RunConfig()
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for key, value in (raw or {}).items():
        if key == "run_dir":
            cfg.run_dir = coerce_field(RunConfig, "run_dir", value, source)
            continue
        cls = SECTIONS.get(key)
        if cls is None:
            raise ConfigError(
                f"{source}: unknown section '{key}'; known: run_dir, {', '.join(SECTIONS)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping of field: value")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown} in section '{key}'; see "
                "`megapatch train --help` for the fields"
            )
        typed = {k: coerce_field(cls, k, v, f"{source}: {key}.{k}") for k, v in value.items()}
        setattr(cfg, key, dataclasses.replace(getattr(cfg, key), **typed))
    return cfg


def load_yaml(path: str) -> RunConfig:
    """A RunConfig from a YAML recipe (sections as in RunConfig)."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"--config {path}: no such file") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from err
    return config_from_dict(raw or {}, source=path)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every config field as a Megatron-style flag (grouped by section), plus --config."""
    from megapatch.fields import _STORE_ONCE

    parser.add_argument(
        "--config", action=_STORE_ONCE, help="YAML recipe (see examples/); flags override it."
    )
    parser.add_argument(
        "--run-dir",
        dest="run_dir",
        action=_STORE_ONCE,
        default=argparse.SUPPRESS,
        help="Run directory: config, metrics, checkpoints, plots (default: runs/default).",
    )
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(name, (cls.__doc__ or "").strip().splitlines()[0])
        skip = _DATA_SKIP if name == "data" else ()
        add_arguments(group, cls, skip=skip, dest_prefix=f"{name}.", suppress_defaults=True)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe (if any) overridden by the flags that were given."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    given = vars(args)
    if "run_dir" in given:
        cfg.run_dir = given["run_dir"]
    for name in SECTIONS:
        updates = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(name + ".")}
        if updates:
            setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **updates))
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
