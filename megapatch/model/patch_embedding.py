"""Patch embedding: the input of patch i is the mean of its K token embeddings.

    E(p_i) = (1/K) * sum_{k<K} E(x_{iK+k})        (no new parameters, no scaling)

Implemented as a subclass of megatron-core's ``LanguageModelEmbedding`` that keeps the
vocab-parallel table (``embedding.word_embeddings.weight``: tying and checkpoint keys are
unchanged). Each TP rank averages its *partial* lookups (tokens outside its vocab shard
contribute zero) before the TP all-reduce, or the sequence-parallel reduce-scatter: the mean is
linear, so this is exact and the collective moves K times fewer elements than reducing tokens.
With K=1 it is exactly megatron's embedding.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from torch import Tensor


class PatchEmbedding(LanguageModelEmbedding):
    """Token embedding at K=1, mean-of-K patch embedding at K>1 (same weights)."""

    patch_size: int = 1

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None, tokentype_ids: int | None = None
    ) -> Tensor:
        """[b, K*T] token ids -> [T, b, h] (or [T/tp, b, h] under SP).

        ``position_ids`` [b, K*T] hold each token's patch index (j // K); only a learned
        position table reads them (RoPE positions follow the sequence length).
        """
        k = self.patch_size
        if k == 1:
            return super().forward(input_ids, position_ids, tokentype_ids)
        if tokentype_ids is not None:
            raise ValueError("token types are not supported with patch size > 1")
        b, n = input_ids.shape
        if n % k:
            raise ValueError(
                f"input of {n} tokens per sample is not a whole number of patches of size {k}"
            )
        table = self.word_embeddings
        ids = input_ids.reshape(b * (n // k), k)
        if table.tp_group.size() > 1:
            outside = (ids < table.vocab_start_index) | (ids >= table.vocab_end_index)
            local = (ids - table.vocab_start_index).masked_fill(outside, 0)
            weights = (~outside).to(table.weight.dtype) / k
            partial = F.embedding_bag(local, table.weight, per_sample_weights=weights, mode="sum")
        else:
            partial = F.embedding_bag(ids, table.weight, mode="mean")
        partial = partial.view(b, n // k, -1)  # [b, T, h]: this rank's share of each patch mean
        if table.reduce_scatter_embeddings:
            emb = tensor_parallel.reduce_scatter_to_sequence_parallel_region(
                partial.transpose(0, 1).contiguous(), group=table.tp_group
            )
        else:
            emb = tensor_parallel.reduce_from_tensor_model_parallel_region(
                partial, group=table.tp_group
            )
        if self.add_position_embedding:
            # Learned positions are indexed by patch. position_ids give each token the index of
            # its patch (j // K, as the data pipeline writes them): take one per patch.
            patch_pos = position_ids[:, ::k]
            emb = emb + self.position_embeddings(patch_pos)
        if not self.reduce_scatter_embeddings:
            emb = emb.transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if self.config.sequence_parallel:
            if not self.reduce_scatter_embeddings and self.scatter_to_sequence_parallel:
                emb = tensor_parallel.scatter_to_sequence_parallel_region(emb, group=self.tp_group)
            if self.config.clone_scatter_output_in_embedding and self.scatter_to_sequence_parallel:
                emb = emb.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(emb)
        return self.embedding_dropout(emb)
