"""The memory estimate against a real PatchGPTModel on CPU (megatron-core's local layers).

Activations: every tensor autograd saves for the backward pass during one forward, caught with
``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage, by region (input,
transformer layers, output side and loss). Model state: the parameters, megatron DDP's fp32
gradient buffers and the optimizer's fp32 master weights and Adam moments after one real step.
Both at K=1 and K=4, fp32 and bf16, GQA + SwiGLU and MHA + GELU; TP2 with sequence parallelism
and the distributed optimizer over DP2 in a 2-rank gloo world.

Tolerance: exact for the layers, the output side and the model state; the input side within 16
bytes (autograd keeps a few small index scalars that the estimate leaves out).
"""

from __future__ import annotations

import pytest
import torch

from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
from megapatch.planning import memory as M

T, B, VOCAB = 32, 2, 500


def _model(swiglu: bool) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96 if swiglu else 256,
        num_attention_heads=4,
        num_query_groups=2 if swiglu else None,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=64,
        swiglu=swiglu,
    )


def _measure(model: ModelConfig, parallel: ParallelConfig, bf16: bool, k: int) -> dict:
    from megapatch.model import build_model
    from megapatch.planning.measure import measure_activations, sample_batch
    from megapatch.runtime import distributed as D

    D.initialize_model_parallel(parallel)
    D.set_random_seeds(1)
    prec = PrecisionConfig(transformer_impl="local", bf16=bf16)
    [m] = build_model(model, parallel, prec, patch_size=k)
    if bf16:
        m = m.to(torch.bfloat16)
    return measure_activations(m, sample_batch(B, k, T, VOCAB))


def _estimate(model: ModelConfig, parallel: ParallelConfig, bf16: bool, k: int) -> dict:
    cfg = RunConfig(
        model=model,
        parallel=parallel,
        precision=PrecisionConfig(transformer_impl="local", bf16=bf16),
    )
    setup = M.ActivationSetup.from_config(cfg, "local")
    vocab = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    layers = M.layer_activation_terms(model, setup, T, B)
    return {
        "embedding": sum(M.embedding_activation_terms(model, setup, T, B, k).values()),
        "layers": model.num_layers * sum(layers.values()),
        "output": sum(M.output_activation_terms(model, setup, T, B, k, vocab).values()),
    }


def _compare(measured: dict, estimated: dict) -> None:
    assert measured["layers"] == estimated["layers"]
    assert measured["output"] + measured["loss"] == estimated["output"]
    assert abs(measured["embedding"] - estimated["embedding"]) <= 16, (measured, estimated)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("swiglu", [True, False], ids=["gqa-swiglu", "mha-gelu"])
def test_activations_per_micro_batch_match_the_saved_tensors(single_rank, swiglu, bf16, k):
    model = _model(swiglu)
    measured = _measure(model, ParallelConfig(), bf16, k)
    _compare(measured, _estimate(model, ParallelConfig(), bf16, k))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_model_state_matches_the_tensors_after_a_real_step(single_rank, bf16):
    out = _model_state(ParallelConfig(), bf16, distributed_optimizer=False)
    assert out["measured"] == out["estimated"]


def _model_state(parallel: ParallelConfig, bf16: bool, distributed_optimizer: bool) -> dict:
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import Float16Module

    from megapatch.model import build_model, transformer_config
    from megapatch.planning.measure import measure_model_state, one_training_step, sample_batch
    from megapatch.runtime import distributed as D
    from megapatch.training import step as S

    D.initialize_model_parallel(parallel)
    D.set_random_seeds(1)
    model = _model(True)
    prec = PrecisionConfig(transformer_impl="local", bf16=bf16)
    tcfg = transformer_config(model, parallel, prec)
    chunks = build_model(model, parallel, prec, config=tcfg)
    if bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    ddp = S.wrap_with_ddp(chunks, tcfg, use_distributed_optimizer=distributed_optimizer)
    opt = S.build_optimizer(
        ddp,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        ),
    )
    one_training_step(ddp, opt, iter([sample_batch(B, 1, 16, VOCAB)]), 16, B)
    measured = measure_model_state(ddp, opt)
    tp = parallel.tensor_model_parallel_size
    [rp] = M.params_per_rank(model, tp, 1)
    dp = torch.distributed.get_world_size() // tp
    est = M.model_state_bytes(
        rp, bf16=bf16, distributed_optimizer=distributed_optimizer, data_parallel=dp
    )
    return dict(measured=measured, estimated={k: est[k] for k in measured})


def _two_rank_checks(rank: int, world: int) -> dict:
    from megapatch.runtime import distributed as D

    tp2 = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    out = {}
    for swiglu in (True, False):
        for k in (1, 4):
            model = _model(swiglu)
            out[f"act-{swiglu}-{k}"] = (
                _measure(model, tp2, False, k),
                _estimate(model, tp2, False, k),
            )
    out["state-distopt-dp2"] = _model_state(ParallelConfig(), False, distributed_optimizer=True)
    D.initialize_model_parallel(ParallelConfig())
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from megapatch.runtime.spawn import run_on_ranks

    return run_on_ranks(_two_rank_checks, 2, timeout_s=600)


def test_tensor_and_sequence_parallel_activations_per_rank(two_ranks):
    for results in two_ranks:
        for key, (measured, estimated) in results.items():
            if key.startswith("act-"):
                _compare(measured, estimated)


def test_distributed_optimizer_state_is_sharded_over_data_parallel_ranks(two_ranks):
    # Adam's moments (fp32) are split over DP: each rank holds half; weights and gradient
    # buffers are whole.
    for results in two_ranks:
        out = results["state-distopt-dp2"]
        assert out["measured"] == pytest.approx(out["estimated"], rel=0.01, abs=64)
