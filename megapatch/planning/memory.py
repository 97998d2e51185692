"""Per-GPU memory of a run, term by term, derived from the model config and the layout.

Everything here is arithmetic on the config: no model is built and nothing is imported from
megatron-core, so a laptop can plan an H100 run. The terms follow what megatron-core 0.16.1
and megapatch actually allocate and save for the backward pass:

**Parameters per rank** are counted from the model shapes the way megatron-core shards them:
column-parallel QKV and FC1 (``[h, (H+2G)d/tp]``, ``[h, F/tp]`` or ``2F/tp`` with SwiGLU),
row-parallel projection and FC2, replicated norms (and row-parallel biases), the vocab-parallel
embedding ``[V_pad/tp, h]`` on the first pipeline stage and the output layer (or, tied with
PP > 1, its shared copy) and the final norm on the last stage.

**Model state per parameter:** the weights (2 bytes in bf16, 4 in fp32), the fp32 gradient
buffer of megatron's DDP (``grad_reduce_in_fp32``), and Adam's two fp32 moments plus, in bf16,
the fp32 master weights: 18 bytes per parameter in bf16, or ``6 + 12/DP`` with the distributed
optimizer -- Megatron-LM's own numbers. Under FP8, Transformer Engine also keeps an FP8 copy of
each transformer GEMM weight and of its transpose between micro-batches (2 bytes per GEMM
parameter); Megatron-LM's formula leaves that out.

**Activations per micro-batch** (``n`` = positions x micro-batch, ``a`` = activation bytes,
``ts`` = TP under sequence parallelism else 1) for two implementations:

* ``te`` -- Transformer Engine layers (what ``--transformer-impl auto`` resolves to on a GPU
  cluster): per layer the attention-norm input ``a*n*h/ts``, the QKV GEMM input ``g*n*h/ts``
  (``g`` = 1 byte under FP8, TE keeps the FP8 cast; else ``a``), query and key after RoPE and the
  value ``a*n*(H+2G)d/tp``, the attention output ``a*n*Hd/tp`` (flash attention keeps no score
  matrix, only fp32 log-sum-exp statistics), the MLP-norm input and FC1 GEMM input as for
  attention, the FC1 output ``a*n*F/tp`` (``2F`` with SwiGLU, kept by the fused activation), the
  FC2 GEMM input ``g*n*F/tp``, and one byte per element for each dropout mask when dropout is on.
  With a GELU MLP, F = 4h, MHA and dropout this is exactly the 34*s*b*h/tp of Korthikanti et
  al. 2022 (Table 2, sequence parallel with selective recompute), which Megatron-LM implements
  as ``s*b*h*(18 + 4F/h)/tp``; SwiGLU's wider FC1 output and no dropout make Llama-style layers
  ``s*b*(16h + 6F)/tp`` in bf16 (``15h + 5F`` with FP8).
* ``local`` -- megatron-core's local layers (what runs on CPU and is measured in the tests):
  the torch norms compute in fp32 and keep their fp32 input, statistics and output, the attention
  keeps the causal mask and the ``[b, H/tp, s, s]`` fp32 softmax (plus its cast for the value
  product in bf16), GQA keys and values repeated to H heads (with MHA the value is a view of the
  fused QKV output, which stays alive whole), and SwiGLU keeps its three F-wide intermediates.

The input side saves the token ids (``8*n`` bytes; at K > 1 the ``embedding_bag`` over the K
ids of each patch: ``16*K*n + 24*n``, or ``(8 + param bytes)*K*n + 24*n`` at TP > 1); the output
side the final norm, the output-layer input, the loss's fp32 softmax ``4*n*V_pad/tp`` (the
patch stage has T positions, so the logits are ``[T, b, V/tp]``, never ``[K*T, ...]``) and the
targets (``9*K*n``: int64 ids and a bool shard mask per target). The patch stage therefore
differs from the token stage only by these K-fold id and target terms.

Checked against a real ``PatchGPTModel`` forward/backward on CPU (``local``; fp32 and bf16;
K=1 and K=4; TP1, and TP2 with SP; tests/training/test_estimate_measured.py): the transformer
layers and the output side equal the saved tensors measured with
``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage) to the byte, the input
side within 8 bytes; weights, gradient buffers and Adam state equal the tensors after a real
step (the distributed optimizer's shard within 1%). ``te`` is checked against Megatron-LM's
theoretical-memory formula (tests/training/test_estimate_megatron.py, benchmarks/bench_memory.py)
on the 7B, 370M, 1.3B and 2.7B recipes at several layouts: weight and optimizer memory within
0.02%; activations under the formula's assumptions (GELU, MHA, dropout, LayerNorm, selective
recompute) within 0.05%, Korthikanti's 34·s·b·h/tp per layer exactly up to the norms' statistics.

**Micro-batches in flight** on pipeline rank r (0-based) of p: ``min(p - r, m)`` under 1F1B,
``min(2(p-r-1) + (v-1)p + 1, m*v)`` model-chunk micro-batches of L/(p*v) layers each under the
interleaved schedule (megatron's warm-up count plus one), i.e. rank 0 holds
``L*(1 + (p-1)/(p*v))`` layer-micro-batches, Megatron-LM's interleaving penalty.

**Peak per rank** = model state + activations in flight + the largest transient (a second
logits-sized buffer at the loss -- the bf16 logits next to the fp32 softmax in the forward pass,
the bf16 logits gradient in the backward pass -- and, with full recompute, one recomputed group of
layers) + a fixed runtime reserve (CUDA context, NCCL and cuBLAS/TE workspaces, activation
gradients in flight) of :data:`RUNTIME_RESERVE_GIB`. Allocator fragmentation is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megapatch.config import ModelConfig, RunConfig

GIB = 1024**3
RUNTIME_RESERVE_GIB = 2.0  # CUDA context, NCCL/cuBLAS/TE workspaces, activation gradients
FP8_WEIGHT_COPY_BYTES = 2  # TE: an FP8 copy of each GEMM weight and of its transpose


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class RankParams:
    """Parameters held by one tensor-parallel rank of one pipeline stage."""

    pp_rank: int
    num_layers: int  # transformer layers on this rank (all its virtual chunks)
    embedding: int  # word (and learned position) embeddings
    layers: int  # all transformer layers on this rank
    final_norm: int
    output: int  # output layer, or the shared copy of a tied embedding (PP > 1)
    gemm: int  # transformer-layer GEMM weights (kept in FP8 copies under FP8)

    @property
    def total(self) -> int:
        """All parameters of this rank."""
        return self.embedding + self.layers + self.final_norm + self.output


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    """(attention heads, query groups, head dim)."""
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or model.hidden_size // heads
    return heads, groups, head_dim


def _norm_params(model: ModelConfig, width: int) -> int:
    return width * (2 if model.normalization == "LayerNorm" else 1)


def layer_params(model: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of one transformer layer on one TP rank, by tensor (megatron's sharding)."""
    h, f = model.hidden_size, model.resolved_ffn_hidden_size()
    heads, groups, d = _heads(model)
    fc1 = f * (2 if model.swiglu else 1)
    bias = model.add_bias_linear
    out = {
        "qkv": h * (heads + 2 * groups) * d // tp,
        "proj": heads * d * h // tp,
        "fc1": h * fc1 // tp,
        "fc2": f * h // tp,
        "norms": 2 * _norm_params(model, h),
    }
    if bias:  # column-parallel biases are sharded, row-parallel ones replicated
        out["biases"] = (heads + 2 * groups) * d // tp + h + fc1 // tp + h
    if model.qk_layernorm:
        out["qk_norms"] = 2 * _norm_params(model, d)
    return out


def _gemm(layer: dict[str, int]) -> int:
    return layer["qkv"] + layer["proj"] + layer["fc1"] + layer["fc2"]


def total_parameters(model: ModelConfig, padded_vocab: int | None = None) -> int:
    """All parameters of the model (the vocabulary padded to ``padded_vocab`` if given)."""
    vocab = padded_vocab if padded_vocab is not None else model.vocab_size
    emb = vocab * model.hidden_size
    pos = (
        model.max_position_embeddings * model.hidden_size
        if model.position_embedding_type == "learned_absolute"
        else 0
    )
    layers = model.num_layers * sum(layer_params(model, 1).values())
    out = emb if model.untie_embeddings_and_output_weights else 0
    return emb + pos + layers + _norm_params(model, model.hidden_size) + out


def params_per_rank(model: ModelConfig, tp: int, pp: int) -> list[RankParams]:
    """Parameters of each pipeline rank (one TP shard), first stage first."""
    h = model.hidden_size
    vocab = model.padded_vocab_size(tp)
    layer = layer_params(model, tp)
    per_rank_layers = model.num_layers // pp
    ranks = []
    for r in range(pp):
        first, last = r == 0, r == pp - 1
        emb = vocab // tp * h if first else 0
        if first and model.position_embedding_type == "learned_absolute":
            emb += model.max_position_embeddings * h
        out = 0
        if last and (model.untie_embeddings_and_output_weights or pp > 1):
            out = vocab // tp * h
        ranks.append(
            RankParams(
                pp_rank=r,
                num_layers=per_rank_layers,
                embedding=emb,
                layers=per_rank_layers * sum(layer.values()),
                final_norm=_norm_params(model, h) if last else 0,
                output=out,
                gemm=per_rank_layers * _gemm(layer),
            )
        )
    return ranks


# --------------------------------------------------------------------------------- model state
def model_state_bytes(
    params: RankParams,
    *,
    bf16: bool,
    distributed_optimizer: bool,
    data_parallel: int,
    fp8_weight_copies: bool = False,
    fp8_gemm_params: int | None = None,
) -> dict[str, float]:
    """Weights, gradient buffer, optimizer state (and FP8 weight copies) of one rank, bytes.

    ``optimizer_unsharded`` is the optimizer state without the distributed optimizer (for the
    comparison line of the report); ``optimizer`` is what this run holds.
    """
    p = params.total
    opt_per_param = (4 if bf16 else 0) + 8  # fp32 master weights (bf16 only) + Adam m, v
    shard = data_parallel if distributed_optimizer else 1
    out = {
        "weights": p * (2 if bf16 else 4),
        "gradients": p * 4.0,  # megatron DDP main_grad buffer, fp32
        "optimizer": p * opt_per_param / shard,
        "optimizer_unsharded": p * float(opt_per_param),
        "fp8_weight_copies": 0.0,
    }
    if fp8_weight_copies:
        gemm = params.gemm if fp8_gemm_params is None else fp8_gemm_params
        out["fp8_weight_copies"] = gemm * float(FP8_WEIGHT_COPY_BYTES)
    return out


# --------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationSetup:
    """What determines the saved activations of one micro-batch."""

    impl: str  # "te" (Transformer Engine) or "local" (megatron-core local layers)
    tp: int = 1
    sequence_parallel: bool = False
    act_bytes: int = 2  # bf16 2, fp32 4
    param_bytes: int = 2
    fp8: bool = False
    recompute: str | None = None  # None, "selective", "full"
    recompute_method: str | None = None  # "uniform" or "block" with full recompute
    recompute_num_layers: int | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig, impl: str | None = None) -> ActivationSetup:
        """The setup of ``cfg``; ``impl`` defaults to TE unless ``--transformer-impl local``."""
        prec, par, tr, m = cfg.precision, cfg.parallel, cfg.training, cfg.model
        impl = impl or ("local" if prec.transformer_impl == "local" else "te")
        dtype_bytes = 2 if prec.bf16 else 4
        return cls(
            impl=impl,
            tp=par.tensor_model_parallel_size,
            sequence_parallel=par.sequence_parallel,
            act_bytes=dtype_bytes,
            param_bytes=dtype_bytes,
            fp8=prec.fp8_format is not None and impl == "te",
            recompute=tr.recompute_granularity,
            recompute_method=tr.recompute_method or "uniform",
            recompute_num_layers=tr.recompute_num_layers,
            attention_dropout=m.attention_dropout,
            hidden_dropout=m.hidden_dropout,
        )


def layer_activation_terms(
    model: ModelConfig, setup: ActivationSetup, positions: int, micro_batch: int
) -> dict[str, float]:
    """Bytes saved for the backward pass by ONE transformer layer for one micro-batch.

    Without recompute (or with selective recompute); full recompute is applied per stage by
    :func:`stage_activation_terms`.
    """
    s, b = positions, micro_batch
    n = s * b
    h, f = model.hidden_size, model.resolved_ffn_hidden_size()
    heads, groups, d = _heads(model)
    t = setup.tp
    ts = t if setup.sequence_parallel else 1
    hp, gp = heads // t, groups // t
    a = setup.act_bytes
    fc1 = f * (2 if model.swiglu else 1)
    selective = setup.recompute == "selective"
    layernorm = model.normalization == "LayerNorm"
    terms: dict[str, float] = {}
    if setup.impl == "te":
        g = 1 if setup.fp8 else a  # TE keeps the FP8 cast of an FP8 GEMM's input
        stats = (8 if layernorm else 4) * n / ts  # rsigma (and mu), fp32, per norm
        terms["attention norm input"] = a * n * h / ts + stats
        terms["QKV GEMM input (norm output)"] = g * n * h / ts
        terms["query and key after RoPE"] = a * n * (hp + gp) * d
        terms["value"] = a * n * gp * d
        if not (selective and setup.fp8):
            # the attention output: saved by flash attention and (bf16) as the projection input
            terms["attention output"] = a * n * hp * d
        if setup.fp8:
            terms["projection GEMM input (FP8)"] = n * hp * d
        if not selective:
            terms["attention softmax statistics"] = 4 * n * hp
        terms["MLP norm input"] = a * n * h / ts + stats
        terms["FC1 GEMM input (norm output)"] = g * n * h / ts
        terms["FC1 output (activation input)"] = a * n * fc1 / t
        terms["FC2 GEMM input (activation output)"] = g * n * f / t
    elif setup.impl == "local":
        # torch norms compute in fp32: fp32 input, statistics and normalised output
        norm = (4 * h + 8 if layernorm else 8 * h + 4) * n / ts
        terms["attention norm (fp32 input, statistics, output)"] = norm
        terms["QKV GEMM input (norm output)"] = a * n * h / ts
        terms["RoPE cos/sin"] = 4 * s * d * a
        if selective:  # the checkpointed core attention keeps only its inputs
            terms["query after RoPE"] = a * n * hp * d
            terms["key after RoPE"] = a * n * gp * d
            terms["value (the fused QKV output)"] = a * n * (hp + 2 * gp) * d
        else:
            grouped = hp > gp  # keys and values repeated to H heads
            terms["query after RoPE"] = a * n * hp * d
            terms["key" + (" (repeated to H heads)" if grouped else " after RoPE")] = (
                a * n * (hp if grouped else gp) * d
            )
            terms[
                "value" + (" (repeated to H heads)" if grouped else " (the fused QKV output)")
            ] = a * n * (hp if grouped else hp + 2 * gp) * d
            terms["causal mask"] = s * s
            probs = b * hp * s * s
            dropout = setup.attention_dropout > 0
            extra = (a if (a != 4 or dropout) else 0) + (1 if dropout else 0)
            terms["attention probabilities (fp32 softmax)"] = (4 + extra) * probs
        terms["attention output (projection input)"] = a * n * hp * d
        terms["MLP norm (fp32 input, statistics, output)"] = norm
        terms["FC1 GEMM input (norm output)"] = a * n * h / ts
        terms["FC1 output (activation input)"] = a * n * fc1 / t
        if model.swiglu:
            terms["SwiGLU intermediates (silu, linear half)"] = 2 * a * n * f / t
        terms["FC2 GEMM input (activation output)"] = a * n * f / t
    else:
        raise ValueError(f"unknown implementation {setup.impl!r}: 'te' or 'local'")
    if setup.hidden_dropout > 0:
        terms["dropout masks (attention, MLP)"] = 2 * n * h / ts
    return terms


def embedding_activation_terms(
    model: ModelConfig, setup: ActivationSetup, positions: int, micro_batch: int, patch_size: int
) -> dict[str, float]:
    """Bytes saved by the input side (first pipeline stage) for one micro-batch."""
    n = positions * micro_batch
    k = patch_size
    terms: dict[str, float] = {}
    if k == 1:
        terms["token ids"] = 8 * n + (n if setup.tp > 1 else 0)  # + vocab-shard mask
    elif setup.tp == 1:
        terms["patch token ids (embedding_bag, K per position)"] = 16 * k * n + 24 * n
    else:
        terms["patch token ids (embedding_bag, K per position)"] = (
            8 + setup.param_bytes
        ) * k * n + 24 * n
    if model.position_embedding_type == "learned_absolute":
        terms["position ids"] = 8 * n
    if setup.hidden_dropout > 0:
        ts = setup.tp if setup.sequence_parallel else 1
        terms["embedding dropout mask"] = n * model.hidden_size / ts
    return terms


def output_activation_terms(
    model: ModelConfig,
    setup: ActivationSetup,
    positions: int,
    micro_batch: int,
    patch_size: int,
    padded_vocab: int,
) -> dict[str, float]:
    """Bytes saved by the output side (last pipeline stage) for one micro-batch.

    The logits are ``[positions, b, V/tp]``: T patch positions in the patch stage, each scored
    against its K targets under one fp32 softmax buffer (never K copies of the logits).
    """
    n = positions * micro_batch
    h = model.hidden_size
    ts = setup.tp if setup.sequence_parallel else 1
    a = setup.act_bytes
    layernorm = model.normalization == "LayerNorm"
    if setup.impl == "te":
        final = a * n * h / ts + (8 if layernorm else 4) * n / ts
    else:
        final = (4 * h + 8 if layernorm else 8 * h + 4) * n / ts
    return {
        "final norm": final,
        "output layer input": a * n * h / ts,
        "loss: fp32 softmax over the vocab shard": 4.0 * n * padded_vocab / setup.tp,
        "loss: targets (K per position)": 9.0 * patch_size * n,
    }


def loss_transient_bytes(
    setup: ActivationSetup, positions: int, micro_batch: int, patch_size: int, padded_vocab: int
) -> float:
    """A second logits-sized buffer while the loss runs: the logits next to the fp32 buffer
    (forward), the logits gradient next to it (backward). fp32 logits at K=1 are worked on in
    place by megatron's cross-entropy."""
    n = positions * micro_batch
    if setup.act_bytes == 4 and patch_size == 1:
        return 0.0
    return float(setup.act_bytes) * n * padded_vocab / setup.tp


def in_flight_microbatches(pp: int, vpp: int | None, microbatches: int, pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak, in units of
    that rank's full set of layers (fractional under interleaving)."""
    if pp == 1:
        return float(min(1, microbatches))
    if not vpp:
        return float(min(pp - pp_rank, microbatches))
    chunks = min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


@dataclass
class RankMemory:
    """Memory of one pipeline rank in one stage, bytes."""

    pp_rank: int
    state: dict[str, float]
    layers_per_microbatch: dict[str, float]  # all layers of this rank, one micro-batch
    embedding_per_microbatch: dict[str, float]
    output_per_microbatch: dict[str, float]
    in_flight: float
    transient: dict[str, float]
    reserve: float

    @property
    def activations_per_microbatch(self) -> float:
        """Saved activations of one micro-batch on this rank."""
        return (
            sum(self.layers_per_microbatch.values())
            + sum(self.embedding_per_microbatch.values())
            + sum(self.output_per_microbatch.values())
        )

    @property
    def activations_in_flight(self) -> float:
        """Saved activations of all micro-batches in flight (the loss of only one at a time)."""
        per_mb = sum(self.layers_per_microbatch.values()) + sum(
            self.embedding_per_microbatch.values()
        )
        return self.in_flight * per_mb + sum(self.output_per_microbatch.values())

    @property
    def model_state(self) -> float:
        """Weights + gradients + optimizer state (+ FP8 weight copies)."""
        return sum(v for k, v in self.state.items() if k != "optimizer_unsharded")

    @property
    def peak(self) -> float:
        """Estimated peak allocation of this rank."""
        return (
            self.model_state
            + self.activations_in_flight
            + sum(self.transient.values())
            + self.reserve
        )


@dataclass
class StageMemory:
    """The memory estimate of one stage of the plan: every pipeline rank, and the peak one."""

    stage: str
    ranks: list[RankMemory] = field(default_factory=list)

    @property
    def peak_rank(self) -> RankMemory:
        """The most loaded pipeline rank."""
        return max(self.ranks, key=lambda r: r.peak)


def stage_activation_terms(
    model: ModelConfig,
    setup: ActivationSetup,
    positions: int,
    micro_batch: int,
    layers: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """(saved bytes of ``layers`` layers for one micro-batch, recompute transient).

    Full recompute keeps only each checkpointed group's input (``a*n*h/ts``) and recomputes one
    group at a time in the backward pass: ``uniform`` groups of ``recompute_num_layers``
    layers, or ``block``: the first ``recompute_num_layers`` layers of the rank one by one.
    """
    one = layer_activation_terms(model, setup, positions, micro_batch)
    if setup.recompute != "full":
        return {k: v * layers for k, v in one.items()}, {}
    ts = setup.tp if setup.sequence_parallel else 1
    checkpoint_input = setup.act_bytes * positions * micro_batch * model.hidden_size / ts
    r = max(1, setup.recompute_num_layers or 1)
    full_layer = sum(one.values())
    if setup.recompute_method == "block":
        recomputed = min(r, layers)
        saved = {"checkpointed layer inputs": recomputed * checkpoint_input}
        if model.position_embedding_type == "rope" and recomputed:
            saved["RoPE frequencies (checkpoint input)"] = 4.0 * positions * _heads(model)[2]
        if layers > recomputed:
            saved.update({k: v * (layers - recomputed) for k, v in one.items()})
        transient = {"recomputed layer (backward)": full_layer if recomputed else 0.0}
        return saved, transient
    groups = -(-layers // r)
    saved = {"checkpointed layer-group inputs": groups * checkpoint_input}
    if model.position_embedding_type == "rope":  # the checkpoints also keep the fp32 RoPE table
        saved["RoPE frequencies (checkpoint input)"] = 4.0 * positions * _heads(model)[2]
    return saved, {"recomputed layer group (backward)": min(r, layers) * full_layer}


def stage_memory(
    cfg: RunConfig,
    positions: int,
    micro_batch: int,
    microbatches: int,
    patch_size: int,
    world_size: int,
    *,
    name: str = "",
    impl: str | None = None,
    reserve_gib: float = RUNTIME_RESERVE_GIB,
) -> StageMemory:
    """Memory of every pipeline rank for one stage (positions per sample, micro-batch size,
    micro-batches per step, K) of ``cfg`` on ``world_size`` ranks."""
    m, par = cfg.model, cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size
    dp = par.data_parallel_size(world_size)
    setup = ActivationSetup.from_config(cfg, impl)
    vocab = m.padded_vocab_size(tp)
    prec = cfg.precision
    out = StageMemory(stage=name)
    for rp in params_per_rank(m, tp, pp):
        fp8_gemm = rp.gemm
        if setup.fp8 and prec.first_last_layers_bf16:
            bf16_layers = _bf16_layers_on_rank(cfg, rp.pp_rank)
            fp8_gemm = rp.gemm // max(rp.num_layers, 1) * (rp.num_layers - bf16_layers)
        state = model_state_bytes(
            rp,
            bf16=prec.bf16,
            distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
            data_parallel=dp,
            fp8_weight_copies=setup.fp8,
            fp8_gemm_params=fp8_gemm,
        )
        layers, transient = stage_activation_terms(m, setup, positions, micro_batch, rp.num_layers)
        first, last = rp.pp_rank == 0, rp.pp_rank == pp - 1
        emb = (
            embedding_activation_terms(m, setup, positions, micro_batch, patch_size)
            if first
            else {}
        )
        outp = (
            output_activation_terms(m, setup, positions, micro_batch, patch_size, vocab)
            if last
            else {}
        )
        if last:
            transient = dict(
                transient,
                **{
                    "logits copy at the loss": loss_transient_bytes(
                        setup, positions, micro_batch, patch_size, vocab
                    )
                },
            )
        # one transient at a time: keep the largest
        if transient:
            key = max(transient, key=transient.get)
            transient = {key: transient[key]}
        out.ranks.append(
            RankMemory(
                pp_rank=rp.pp_rank,
                state=state,
                layers_per_microbatch=layers,
                embedding_per_microbatch=emb,
                output_per_microbatch=outp,
                in_flight=in_flight_microbatches(pp, vpp, microbatches, rp.pp_rank),
                transient=transient,
                reserve=reserve_gib * GIB,
            )
        )
    return out


def _bf16_layers_on_rank(cfg: RunConfig, pp_rank: int) -> int:
    """Layers of this pipeline rank kept in bf16 by --first-last-layers-bf16."""
    prec, m, par = cfg.precision, cfg.model, cfg.parallel
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size or 1
    per_chunk = m.num_layers // (pp * vpp)
    mine = {
        (pp_rank + pp * j) * per_chunk + i for j in range(vpp) for i in range(per_chunk)
    }  # chunk c = rank + pp * j holds layers [c * per_chunk, (c + 1) * per_chunk)
    kept = set(range(prec.num_layers_at_start_in_bf16))
    kept |= set(range(m.num_layers - prec.num_layers_at_end_in_bf16, m.num_layers))
    return len(mine & kept)
