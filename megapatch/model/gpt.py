"""``PatchGPTModel``: megatron-core's ``GPTModel`` with a run-time patch size K.

At K=1 this is exactly ``GPTModel``: same modules, same parameters, same code path, same loss.
At K>1 a sample of K*T input tokens becomes T patch positions:

* input: the mean of each patch's K token embeddings (:mod:`.patch_embedding`);
* positions: RoPE over patch indices 0..T-1 (RoPE follows the decoder input length), the causal
  mask over patches; pipeline stages carry T positions;
* output: the same LM head and weight tying, one softmax per patch, scored against each of the
  K tokens of the next patch (:mod:`.patch_loss`).

Labels are the Megatron analogue of ``add_extra_token`` shifted by a whole patch: for a sample
of K*T+K tokens ``x``, ``input_ids = x[:K*T]`` and ``labels = x[K:]``, so ``labels[:, i*K + k]``
is token k of patch i+1. The loss comes back per target token, [b, K*T], aligned with
``labels`` and with the loss mask, so the training loop averages over real tokens at any K.
The weights never change shape, so K can be switched at run time (``set_patch_size``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megapatch.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from megapatch.model import specs
from megapatch.model.patch_embedding import PatchEmbedding
from megapatch.model.patch_loss import vocab_parallel_multi_token_cross_entropy
from megapatch.model.specs import block_spec, check_fp8_positions, use_transformer_engine


class PatchGPTModel(GPTModel):
    """GPTModel whose input is K-token patches and whose loss predicts the next patch."""

    def __init__(
        self, *args: Any, patch_size: int = 1, real_vocab_size: int | None = None, **kwargs: Any
    ) -> None:
        if specs.INIT_SEED[0] is not None:
            torch.manual_seed(specs.INIT_SEED[0])  # embedding, then layers reseed themselves
        super().__init__(*args, **kwargs)
        if self.pre_process:
            # Same module, same parameters and construction-time RNG draws as GPTModel's
            # embedding; only the forward learns about patches.
            self.embedding.__class__ = PatchEmbedding
        # The tokenizer's vocabulary; rows beyond it only pad the table for TP (never targets).
        self.real_vocab_size = real_vocab_size or self.vocab_size
        if not 0 < self.real_vocab_size <= self.vocab_size:
            raise ConfigError(
                f"--vocab-size {self.real_vocab_size} must lie in [1, {self.vocab_size}] (the "
                "padded vocabulary)"
            )
        self.patch_size = 1
        self.set_patch_size(patch_size)

    def set_patch_size(self, patch_size: int) -> None:
        """Switch K (1 = ordinary token-level GPT). Weights are untouched."""
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ConfigError(f"--patch-size must be an integer >= 1, got {patch_size!r}")
        if patch_size > 1 and self.config.mtp_num_layers:
            raise ConfigError(
                "--patch-size > 1 cannot be combined with --mtp-num-layers: megatron's "
                "multi-token prediction is a different auxiliary loss; disable MTP for patch "
                "training"
            )
        self.patch_size = patch_size
        if self.pre_process:
            self.embedding.patch_size = patch_size

    def forward(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        decoder_input: Tensor | None = None,
        labels: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """As ``GPTModel.forward``; inputs and labels are [b, K*T] tokens."""
        k = self.patch_size
        if k > 1:
            n = None
            if input_ids is not None:
                if input_ids.dim() != 2 or input_ids.size(1) % k:
                    raise ValueError(
                        f"input_ids of shape {tuple(input_ids.shape)} is not [batch, K*T] for "
                        f"patch size K={k}: the sample length must be a multiple of K"
                    )
                n = input_ids.size(1)
                check_fp8_positions(self.config, n // k)
            if labels is not None and self.post_process:
                if labels.dim() != 2 or labels.size(1) % k:
                    raise ValueError(
                        f"labels of shape {tuple(labels.shape)} is not [batch, K*T] for patch "
                        f"size K={k}"
                    )
                if input_ids is not None and labels.shape != input_ids.shape:
                    raise ValueError(
                        f"labels {tuple(labels.shape)} must have the shape of input_ids "
                        f"{tuple(input_ids.shape)}: labels[:, j] is the token K positions after "
                        "input_ids[:, j]"
                    )
        elif input_ids is not None:
            check_fp8_positions(self.config, input_ids.size(1))
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs
        )

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-target-token loss [b, K*T] over the real vocabulary (padding rows masked);
        megatron's own loss at K=1."""
        k = self.patch_size
        tp = self.pg_collection.tp
        gathered = logits.size(-1) == self.vocab_size and tp.size() > 1
        logits = self._mask_vocab_padding(logits, gathered)
        if k == 1:
            return super().compute_language_model_loss(labels, logits)
        t, b = logits.shape[:2]
        if labels.shape != (b, t * k):
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match {t} patch positions x K={k} for "
                f"batch {b}"
            )
        targets = labels.view(b, t, k).transpose(0, 1)  # [T, b, K]
        loss = vocab_parallel_multi_token_cross_entropy(logits, targets, None if gathered else tp)
        return loss.transpose(0, 1).reshape(b, t * k)

    def _mask_vocab_padding(self, logits: Tensor, gathered: bool) -> Tensor:
        """Logits of the padding rows (ids >= the tokenizer's vocabulary) set to -inf, so the
        softmax spans the real vocabulary only: the trained model is the one the export
        (which drops the padding rows) describes. Padding rows get no gradient from the loss."""
        if self.real_vocab_size == self.vocab_size:
            return logits
        local = logits.size(-1)
        start = 0 if gathered else self.pg_collection.tp.rank() * local
        first_pad = min(max(self.real_vocab_size - start, 0), local)
        if first_pad == local:
            return logits
        logits = logits.clone() if logits.requires_grad and logits.is_leaf else logits
        logits[..., first_pad:] = float("-inf")
        return logits


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig
) -> TransformerConfig:
    """megatron-core TransformerConfig for this model, layout and precision."""
    model.validate()
    parallel.validate(model)
    precision.validate()
    te = use_transformer_engine(precision)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    fp8: dict[str, Any] = {}
    if precision.fp8_format is not None:
        fp8 = dict(
            fp8=precision.fp8_format,
            fp8_recipe=precision.fp8_recipe,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            first_last_layers_bf16=precision.first_last_layers_bf16,
            num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.resolved_ffn_hidden_size(),
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=torch.nn.functional.silu if model.swiglu else torch.nn.functional.gelu,
        add_bias_linear=model.add_bias_linear,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        qk_layernorm=model.qk_layernorm,
        mtp_num_layers=model.mtp_num_layers,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=precision.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        # Fused kernels come with Transformer Engine / apex; plain torch elsewhere.
        gradient_accumulation_fusion=te,
        bias_activation_fusion=te and model.swiglu,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # The loop averages over real target tokens of the whole global batch.
        calculate_per_token_loss=True,
        **fp8,
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    patch_size: int = 1,
    config: TransformerConfig | None = None,
    init_seed: int | None = None,
) -> list[PatchGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage) on the current device.

    megatron-core's parallel state must be initialised for ``parallel``. Initialisation draws
    from the generators as seeded (``runtime.distributed.set_random_seeds``), or, with
    ``init_seed``, from a generator reseeded per layer: with CPU initialisation the initial
    weights are then the same at every TP/PP/VPP layout.
    """
    config = config or transformer_config(model, parallel, precision)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    specs.INIT_SEED[0] = init_seed
    try:
        _build_chunks(model, parallel, precision, patch_size, config, vpp, chunks)
    finally:
        specs.INIT_SEED[0] = None
    return chunks


def _build_chunks(model, parallel, precision, patch_size, config, vpp, chunks) -> None:  # noqa: ANN001
    for i in range(vpp or 1):
        vp = i if vpp else None
        chunk = PatchGPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, precision, vp_stage=vp),
            vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            vp_stage=vp,
            patch_size=patch_size,
            real_vocab_size=model.vocab_size,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)


def set_patch_size(chunks: list[PatchGPTModel], patch_size: int) -> None:
    """Switch K on every model chunk of this rank (unwrapping DDP / Float16Module wrappers)."""
    for chunk in chunks:
        inner = chunk
        while not isinstance(inner, PatchGPTModel) and hasattr(inner, "module"):
            inner = inner.module
        inner.set_patch_size(patch_size)
