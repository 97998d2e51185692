"""The one weight map between megapatch (Megatron-Core GPT) and Hugging Face Llama.

Every tensor of a Llama-style model is described once, by a :class:`Rule`: its key in a Megatron
dist checkpoint, its Hugging Face names and shapes, and how the two relate (``Kind``). Export
(:meth:`WeightMap.to_hf`) and import (:meth:`WeightMap.to_megatron`) use the same rules, so there
is no second table to drift out of sync.

Megatron side (dist checkpoint keys, layout-independent). Per-layer tensors are stored as ONE
global tensor per kind with a leading layer axis (``decoder.layers.mlp.linear_fc2.weight`` is
[L, h, F]); a rule addresses layer ``i`` of it. Tensor parallelism never shows on disk: the keys
hold the unsharded tensors, except that the vocabulary is padded to a multiple of
``make_vocab_size_divisible_by`` x TP (``padded_vocab``).

===================================================  =========================================
Megatron key (per layer: [L, ...])                    Hugging Face Llama
===================================================  =========================================
embedding.word_embeddings.weight [Vp, h]              model.embed_tokens.weight [V, h]
decoder.layers.self_attention.linear_qkv              model.layers.i.input_layernorm.weight
  .layer_norm_weight [h]
decoder.layers.self_attention.linear_qkv.weight       model.layers.i.self_attn.{q,k,v}_proj.weight
  [(n_q + 2 n_kv) d, h], grouped per KV group:          [n_q d, h], [n_kv d, h], [n_kv d, h]
  [group g: its n_q/n_kv query heads, its k, its v]
decoder.layers.self_attention.linear_proj.weight      model.layers.i.self_attn.o_proj.weight
decoder.layers.mlp.linear_fc1.layer_norm_weight [h]   model.layers.i.post_attention_layernorm.weight
decoder.layers.mlp.linear_fc1.weight [2F, h]          model.layers.i.mlp.gate_proj.weight [F, h]
  = [gate; up]                                          and up_proj.weight [F, h]
decoder.layers.mlp.linear_fc2.weight [h, F]           model.layers.i.mlp.down_proj.weight
decoder.final_layernorm.weight [h]                    model.norm.weight
output_layer.weight [Vp, h] (untied only)             lm_head.weight [V, h]
===================================================  =========================================

With ``add_bias_linear`` the same rules carry the ``.bias`` tensors (HF ``attention_bias`` and
``mlp_bias``). Both sides apply RoPE to the two halves of each head (``rotate_half``), so no
permutation of q/k rows is needed (Meta's original interleaved layout is a different story).

Vocabulary padding rows (``V <= row < Vp``) do not exist in Hugging Face. Megatron's softmax
runs over all ``Vp`` logits, so their values matter to its loss: see :func:`pad_vocab`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from megapatch.config import ModelConfig

Shape = tuple[int, ...]

#: Modules whose ``_extra_state`` megatron-core stores per layer (local and TE specs alike),
#: as ShardedObjects ``decoder.layers.<module>._extra_state`` of global shape (L,).
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
LAYER_PREFIX = "decoder.layers."


class MappingError(ValueError):
    """A model or tensor that the Llama weight map cannot represent (names the field / key)."""


class Kind(enum.Enum):
    """How a Megatron tensor relates to its Hugging Face tensor(s)."""

    COPY = "copy"  # same tensor
    QKV = "qkv"  # fused, grouped per KV group  <->  q_proj, k_proj, v_proj
    GATE_UP = "gate_up"  # [gate; up]  <->  gate_proj, up_proj
    VOCAB = "vocab"  # [Vp, h] padded  <->  [V, h]


@dataclass(frozen=True)
class LlamaDims:
    """The sizes a Llama weight map needs (derived from a :class:`ModelConfig`)."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    vocab: int  # real vocabulary (tokenizer size)
    padded_vocab: int  # Megatron's padded vocabulary (>= vocab)
    tied: bool
    bias: bool

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.heads // self.groups

    @classmethod
    def from_model_config(
        cls, cfg: ModelConfig, padded_vocab: int | None = None, where: str = "model"
    ) -> LlamaDims:
        """Dims of ``cfg``; a :class:`MappingError` naming the field when it is not Llama."""
        problems = []
        if cfg.normalization != "RMSNorm":
            problems.append(f"{where}.normalization is {cfg.normalization} (Llama: RMSNorm)")
        if not cfg.swiglu:
            problems.append(f"{where}.swiglu is false (Llama: a SwiGLU MLP)")
        if cfg.position_embedding_type != "rope":
            problems.append(
                f"{where}.position_embedding_type is {cfg.position_embedding_type} (Llama: rope)"
            )
        if cfg.qk_layernorm:
            problems.append(f"{where}.qk_layernorm is true (Llama has no query/key norms)")
        if cfg.mtp_num_layers:
            problems.append(
                f"{where}.mtp_num_layers is {cfg.mtp_num_layers} (Llama has no multi-token-"
                "prediction layers)"
            )
        if problems:
            raise MappingError(
                "not a Llama architecture: "
                + "; ".join(problems)
                + ". Only Llama-style models (RMSNorm, SwiGLU, RoPE) map to Hugging Face Llama"
            )
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        if heads % groups:
            raise MappingError(
                f"{where}.num_attention_heads ({heads}) is not a multiple of "
                f"{where}.num_query_groups ({groups})"
            )
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        vp = cfg.padded_vocab_size(1) if padded_vocab is None else padded_vocab
        if vp < cfg.vocab_size:
            raise MappingError(
                f"padded vocabulary {vp} is smaller than {where}.vocab_size {cfg.vocab_size}"
            )
        return cls(
            num_layers=cfg.num_layers,
            hidden=cfg.hidden_size,
            ffn=cfg.resolved_ffn_hidden_size(),
            heads=heads,
            groups=groups,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            padded_vocab=vp,
            tied=not cfg.untie_embeddings_and_output_weights,
            bias=cfg.add_bias_linear,
        )


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (layer ``layer`` of a stacked key) and its Hugging Face tensor(s)."""

    key: str  # Megatron dist-checkpoint key
    layer: int | None  # index along the leading layer axis; None for non-layer tensors
    shape: Shape  # Megatron shape of this tensor (one layer's slice for stacked keys)
    hf: tuple[tuple[str, Shape], ...]  # Hugging Face names and shapes, in HF order
    kind: Kind

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The Hugging Face names of this rule."""
        return tuple(name for name, _ in self.hf)


@dataclass(frozen=True)
class Group:
    """The rules converted together (one streaming unit: the embedding, a layer, the head)."""

    name: str
    rules: tuple[Rule, ...]


class WeightMap:
    """Megatron <-> Hugging Face Llama for one model: the rules and both transforms."""

    def __init__(self, dims: LlamaDims) -> None:
        self.dims = dims
        self.groups = self._build_groups()

    @property
    def rules(self) -> Iterator[Rule]:
        """Every rule, in Hugging Face order (embedding, layers, final norm, head)."""
        for group in self.groups:
            yield from group.rules

    def megatron_shapes(self) -> dict[str, Shape]:
        """Global shapes of every Megatron key (stacked keys with their layer axis)."""
        out: dict[str, Shape] = {}
        for rule in self.rules:
            if rule.layer is None:
                out[rule.key] = rule.shape
            else:
                out[rule.key] = (self.dims.num_layers, *rule.shape)
        return out

    def hf_shapes(self) -> dict[str, Shape]:
        """Every Hugging Face tensor name and shape (as saved: no tied ``lm_head``)."""
        return {name: shape for rule in self.rules for name, shape in rule.hf}

    def extra_state_keys(self) -> list[str]:
        """ShardedObject keys of the per-layer ``_extra_state`` entries (global shape (L,))."""
        return [f"{LAYER_PREFIX}{m}._extra_state" for m in EXTRA_STATE_MODULES]

    # ----------------------------------------------------------------------------------------
    def _build_groups(self) -> tuple[Group, ...]:
        d = self.dims
        h, f, hd = d.hidden, d.ffn, d.head_dim
        q_rows, kv_rows = d.heads * hd, d.groups * hd
        groups = [
            Group(
                "embedding",
                (
                    Rule(
                        "embedding.word_embeddings.weight",
                        None,
                        (d.padded_vocab, h),
                        (("model.embed_tokens.weight", (d.vocab, h)),),
                        Kind.VOCAB,
                    ),
                ),
            )
        ]
        suffixes = ("weight", "bias") if d.bias else ("weight",)
        for i in range(d.num_layers):
            p = f"model.layers.{i}."
            rules = [
                Rule(
                    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                    i,
                    (h,),
                    ((p + "input_layernorm.weight", (h,)),),
                    Kind.COPY,
                )
            ]
            for s in suffixes:
                w = s == "weight"
                rules.append(
                    Rule(
                        f"decoder.layers.self_attention.linear_qkv.{s}",
                        i,
                        (q_rows + 2 * kv_rows, h) if w else (q_rows + 2 * kv_rows,),
                        tuple(
                            (p + f"self_attn.{n}_proj.{s}", (r, h) if w else (r,))
                            for n, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))
                        ),
                        Kind.QKV,
                    )
                )
            for s in suffixes:
                rules.append(
                    Rule(
                        f"decoder.layers.self_attention.linear_proj.{s}",
                        i,
                        (h, q_rows) if s == "weight" else (h,),
                        ((p + f"self_attn.o_proj.{s}", (h, q_rows) if s == "weight" else (h,)),),
                        Kind.COPY,
                    )
                )
            rules.append(
                Rule(
                    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
                    i,
                    (h,),
                    ((p + "post_attention_layernorm.weight", (h,)),),
                    Kind.COPY,
                )
            )
            for s in suffixes:
                w = s == "weight"
                rules.append(
                    Rule(
                        f"decoder.layers.mlp.linear_fc1.{s}",
                        i,
                        (2 * f, h) if w else (2 * f,),
                        tuple(
                            (p + f"mlp.{n}_proj.{s}", (f, h) if w else (f,)) for n in ("gate", "up")
                        ),
                        Kind.GATE_UP,
                    )
                )
            for s in suffixes:
                rules.append(
                    Rule(
                        f"decoder.layers.mlp.linear_fc2.{s}",
                        i,
                        (h, f) if s == "weight" else (h,),
                        ((p + f"mlp.down_proj.{s}", (h, f) if s == "weight" else (h,)),),
                        Kind.COPY,
                    )
                )
            groups.append(Group(f"layer {i}", tuple(rules)))
        head = [
            Rule(
                "decoder.final_layernorm.weight",
                None,
                (h,),
                (("model.norm.weight", (h,)),),
                Kind.COPY,
            )
        ]
        if not d.tied:
            head.append(
                Rule(
                    "output_layer.weight",
                    None,
                    (d.padded_vocab, h),
                    (("lm_head.weight", (d.vocab, h)),),
                    Kind.VOCAB,
                )
            )
        groups.append(Group("head", tuple(head)))
        return tuple(groups)

    # ----------------------------------------------------------------------------------------
    def to_hf(self, rule: Rule, tensor: Tensor) -> dict[str, Tensor]:
        """Hugging Face tensors of one Megatron tensor (views where possible)."""
        _check_shape(rule.key, rule.layer, tensor, rule.shape)
        d = self.dims
        if rule.kind is Kind.COPY:
            return {rule.hf[0][0]: tensor}
        if rule.kind is Kind.VOCAB:
            return {rule.hf[0][0]: tensor[: d.vocab]}
        if rule.kind is Kind.GATE_UP:
            gate, up = tensor.chunk(2, dim=0)
            return {rule.hf[0][0]: gate, rule.hf[1][0]: up}
        # QKV: [groups, heads_per_group + 2, head_dim, *rest]
        rest = tensor.shape[1:]
        g, hpg, hd = d.groups, d.heads_per_group, d.head_dim
        x = tensor.view(g, hpg + 2, hd, *rest)
        q = x[:, :hpg].reshape(g * hpg * hd, *rest)
        k = x[:, hpg].reshape(g * hd, *rest)
        v = x[:, hpg + 1].reshape(g * hd, *rest)
        return dict(zip(rule.hf_names, (q, k, v)))

    def to_megatron(
        self, rule: Rule, tensors: Mapping[str, Tensor], padding: Tensor | None = None
    ) -> Tensor:
        """The Megatron tensor of one rule from its Hugging Face tensors.

        ``padding``: for vocabulary rules, rows to place after the real vocabulary (see
        :func:`pad_vocab`); other padding rows are the mean of the real rows.
        """
        for name, shape in rule.hf:
            if name not in tensors:
                raise MappingError(f"missing Hugging Face tensor {name} for {rule.key}")
            _check_shape(name, None, tensors[name], shape)
        d = self.dims
        parts = [tensors[name] for name in rule.hf_names]
        if rule.kind is Kind.COPY:
            return parts[0]
        if rule.kind is Kind.VOCAB:
            return pad_vocab(parts[0], d.vocab, d.padded_vocab, padding)
        if rule.kind is Kind.GATE_UP:
            return torch.cat(parts, dim=0)
        q, k, v = parts
        rest = q.shape[1:]
        g, hpg, hd = d.groups, d.heads_per_group, d.head_dim
        x = torch.cat(
            [q.reshape(g, hpg, hd, *rest), k.reshape(g, 1, hd, *rest), v.reshape(g, 1, hd, *rest)],
            dim=1,
        )
        return x.reshape(g * (hpg + 2) * hd, *rest)


def pad_vocab(real: Tensor, vocab: int, padded_vocab: int, padding: Tensor | None = None) -> Tensor:
    """[V or more, h] -> [padded_vocab, h]: the real rows, then padding rows.

    Rows ``real[vocab:]`` and then ``padding`` are kept (up to ``padded_vocab``): re-padding a
    trained table keeps its trained padding rows. Rows still missing are the MEAN of the real
    rows. Megatron's softmax includes the padding logits; a mean row's logit is the mean of the
    real logits, so by Jensen's inequality ``P`` such rows raise the softmax denominator by at
    most a factor ``1 + P / V`` (zero rows would add ``P`` times ``exp(0)`` instead, unbounded
    relative to it).
    """
    if real.shape[0] < vocab:
        raise MappingError(f"vocabulary table has {real.shape[0]} rows, expected >= {vocab}")
    rows = [real[: min(real.shape[0], padded_vocab)]]
    have = rows[0].shape[0]
    if padding is not None and have < padded_vocab:
        extra = padding[: padded_vocab - have].to(real.dtype)
        rows.append(extra)
        have += extra.shape[0]
    if have < padded_vocab:
        mean = real[:vocab].double().mean(dim=0, keepdim=True).to(real.dtype)
        rows.append(mean.expand(padded_vocab - have, -1))
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def _check_shape(name: str, layer: int | None, tensor: Tensor, shape: Shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        where = f"{name} (layer {layer})" if layer is not None else name
        raise MappingError(f"{where} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
