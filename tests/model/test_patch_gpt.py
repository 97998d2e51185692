"""PatchGPTModel against megatron-core's own GPTModel (K=1) and the official formula (K>1)."""

from __future__ import annotations

import types

import pytest
import torch

from megapatch.config import ConfigError, PrecisionConfig
from megapatch.model import PatchGPTModel, build_model, transformer_config
from megapatch.model.specs import check_fp8_positions
from megapatch.runtime import distributed as D
from tests.helpers import fp32, make_samples, parallel, tiny_model


def _build(model_cfg, k=1, seed=1234):
    D.set_random_seeds(seed)
    [m] = build_model(model_cfg, parallel(), fp32(), patch_size=k)
    return m


def _megatron_gpt(model_cfg, seed=1234):
    """megatron-core's own GPTModel with its own local layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = transformer_config(model_cfg, parallel(), fp32())
    D.set_random_seeds(seed)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=cfg.normalization),
        vocab_size=model_cfg.padded_vocab_size(1),
        max_sequence_length=model_cfg.max_position_embeddings,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_base=model_cfg.rotary_base,
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _megatron_loss_over_real_vocab(model, d, vocab_size):
    """megatron's own loss on megatron's GPTModel logits, the padding rows masked out."""
    logits = model(d["tokens"], d["position_ids"], None).transpose(0, 1)  # [s, b, V_padded]
    logits = logits.masked_fill(torch.arange(logits.size(-1)) >= vocab_size, float("-inf"))
    return model.compute_language_model_loss(d["labels"], logits)


@pytest.mark.parametrize("tied", [False, True])
def test_k1_is_exactly_megatron_gpt(single_rank, tied):
    model_cfg = tiny_model(untie_embeddings_and_output_weights=not tied)
    assert model_cfg.padded_vocab_size() > model_cfg.vocab_size  # 250 real rows of 256
    ours, theirs = _build(model_cfg), _megatron_gpt(model_cfg)
    sd_a, sd_b = ours.state_dict(), theirs.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if torch.is_tensor(sd_a[k]))
    d = make_samples(2, 1, 24, model_cfg.vocab_size)
    la = ours(d["tokens"], d["position_ids"], None, labels=d["labels"])
    lb = _megatron_loss_over_real_vocab(theirs, d, model_cfg.vocab_size)
    assert torch.equal(la, lb)
    # Without the mask megatron's loss differs: the padding rows would take probability mass.
    unmasked = theirs(d["tokens"], d["position_ids"], None, labels=d["labels"])
    assert (unmasked - lb).min() > 0
    (la * d["loss_mask"]).sum().backward()
    (lb * d["loss_mask"]).sum().backward()
    ga, gb = _grads(ours), _grads(theirs)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def _official_reference(model_cfg, d, k, masked: bool):
    """Mean embeddings in, (1/K) sum_k CE(logits_i, x_{(i+1)K+k}) out, through a K=1 twin.

    The twin is built from the same seed (identical weights, as the K=1 test shows) and only
    runs the transformer on the hand-made patch embeddings.
    """
    ref = _build(model_cfg, k=1)
    tokens, labels = d["tokens"], d["labels"]
    b, n = tokens.shape
    t = n // k
    table = ref.embedding.word_embeddings.weight
    patches = table[tokens].view(b, t, k, -1).mean(dim=2)  # E(p_i) = mean of K embeddings
    if ref.embedding.add_position_embedding:
        patches = patches + ref.embedding.position_embeddings.weight[:t]
    logits = ref(None, None, None, decoder_input=patches.transpose(0, 1).contiguous())
    # The softmax spans the tokenizer's vocabulary (the padded table rows are not tokens).
    log_probs = torch.log_softmax(logits.float()[..., : model_cfg.vocab_size], dim=-1)
    targets = labels.view(b, t, k)
    nll = torch.stack(
        [-log_probs.gather(-1, targets[..., j : j + 1])[..., 0] for j in range(k)], -1
    )
    if masked:
        mask = d["loss_mask"].view(b, t, k)
        loss = (nll * mask).sum() / mask.sum()
    else:
        loss = nll.sum(-1).div(k).mean()  # the official code's normalisation
    loss.backward()
    return loss, ref


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_patch_loss_and_grads_equal_official_formula(single_rank, k, masked):
    model_cfg = tiny_model()
    model = _build(model_cfg, k=k)
    d = make_samples(3, k, 8, model_cfg.vocab_size, seed=k)
    per_token = model(d["tokens"], d["position_ids"], None, labels=d["labels"])
    assert per_token.shape == d["labels"].shape
    mask = d["loss_mask"] if masked else torch.ones_like(d["loss_mask"])
    loss = (per_token * mask).sum() / mask.sum()
    ref_loss, ref = _official_reference(model_cfg, d, k, masked)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6, (loss.item(), ref_loss.item())
    loss.backward()
    ours, theirs = _grads(model), _grads(ref)
    for name in ours:
        scale = max(theirs[name].abs().max().item(), 1e-3)
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_learned_positions_are_per_patch(single_rank):
    model_cfg = tiny_model(position_embedding_type="learned_absolute")
    model = _build(model_cfg, k=4)
    d = make_samples(2, 4, 6, model_cfg.vocab_size)
    loss = model(d["tokens"], d["position_ids"], None, labels=d["labels"]).mean()
    ref_loss, _ = _official_reference(model_cfg, d, 4, masked=False)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6


def test_per_token_losses_align_with_labels(single_rank):
    """loss[b, i*K + k] is the CE of patch i's logits against labels[b, i*K + k]."""
    model_cfg = tiny_model()
    model = _build(model_cfg, k=4)
    d = make_samples(2, 4, 5, model_cfg.vocab_size)
    per_token = model(d["tokens"], d["position_ids"], None, labels=d["labels"])
    logits = model(d["tokens"], d["position_ids"], None)  # [b, T, V_padded]
    lp = torch.log_softmax(logits.float()[..., : model_cfg.vocab_size], -1)  # real vocabulary
    b, t = 1, 3
    for j in range(4):
        expect = -lp[b, t, d["labels"][b, t * 4 + j]]
        assert abs(per_token[b, t * 4 + j].item() - expect.item()) < 1e-5


def test_patch_size_switches_without_touching_weights(single_rank):
    model_cfg = tiny_model()
    model = _build(model_cfg, k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d1 = make_samples(2, 1, 16, model_cfg.vocab_size)
    first = model(d1["tokens"], d1["position_ids"], None, labels=d1["labels"])
    model.set_patch_size(4)
    d4 = make_samples(2, 4, 4, model_cfg.vocab_size)
    model(d4["tokens"], d4["position_ids"], None, labels=d4["labels"])
    model.set_patch_size(1)
    again = model(d1["tokens"], d1["position_ids"], None, labels=d1["labels"])
    assert torch.equal(first, again)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_inputs_are_refused(single_rank):
    model_cfg = tiny_model()
    model = _build(model_cfg, k=4)
    d = make_samples(1, 4, 4, model_cfg.vocab_size)
    with pytest.raises(ValueError, match="multiple of K"):
        model(d["tokens"][:, :15], None, None, labels=d["labels"][:, :15])
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        model(d["tokens"], None, None, labels=d["labels"][:, :8])
    with pytest.raises(ConfigError, match="--patch-size"):
        model.set_patch_size(0)


def test_mtp_with_patches_is_refused(single_rank):
    model_cfg = tiny_model()
    cfg = transformer_config(model_cfg, parallel(), fp32())
    cfg.mtp_num_layers = 1  # as if --mtp-num-layers 1 had been given
    from megapatch.model.specs import block_spec

    with pytest.raises(ConfigError, match="--mtp-num-layers"):
        PatchGPTModel(
            config=cfg,
            transformer_layer_spec=block_spec(cfg, fp32()),
            vocab_size=256,
            max_sequence_length=64,
            patch_size=4,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision=PrecisionConfig(bf16=True, fp8_format="hybrid")), "Transformer Engine"),
        (dict(precision=PrecisionConfig(fp8_format="hybrid")), "--bf16"),
        (
            dict(precision=PrecisionConfig(bf16=True, fp8_format="e4m3", transformer_impl="local")),
            "--transformer-impl",
        ),
        (dict(precision=PrecisionConfig(transformer_impl="transformer_engine")), "does not import"),
        (dict(par=parallel(sp=True)), "--sequence-parallel"),
        (dict(par=parallel(tp=3)), "must divide --num-attention-heads"),
        (dict(par=parallel(pp=3)), "--num-layers"),
        (dict(par=parallel(pp=1, vpp=2)), "--virtual-pipeline-model-parallel-size"),
        (dict(model=tiny_model(hidden_size=66)), "--hidden-size"),
        (dict(model=tiny_model(num_query_groups=3)), "--num-query-groups"),
    ],
)
def test_bad_configs_are_refused_before_building(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        transformer_config(
            kwargs.get("model", tiny_model()),
            kwargs.get("par", parallel()),
            kwargs.get("precision", fp32()),
        )


def test_fp8_positions_must_be_multiples_of_16():
    cfg = types.SimpleNamespace(fp8="hybrid", tensor_model_parallel_size=2, sequence_parallel=True)
    check_fp8_positions(cfg, 64)  # 32 per TP rank: fine
    with pytest.raises(ConfigError, match="multiple of 16"):
        check_fp8_positions(cfg, 48)  # 24 per rank
    cfg.sequence_parallel = False
    check_fp8_positions(cfg, 48)
    with pytest.raises(ConfigError, match="patch size"):
        check_fp8_positions(cfg, 40)
    check_fp8_positions(types.SimpleNamespace(fp8=None), 7)  # no FP8: anything goes
