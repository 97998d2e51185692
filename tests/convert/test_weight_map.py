"""The one Megatron <-> Hugging Face Llama weight map, against both libraries' own models.

Full-size shapes (Llama-2-7B, Llama-3-8B with GQA) are built on the meta device, so nothing is
allocated: transformers' LlamaForCausalLM gives the Hugging Face names and shapes, megatron's
own GPTModel (through megapatch's build_model) gives the dist-checkpoint keys and global
shapes. The map must produce exactly those sets, nothing missing and nothing left over.
"""

from __future__ import annotations

import json

import pytest
import torch

from megapatch.config import ParallelConfig, PrecisionConfig
from megapatch.convert.common import ConvertError
from megapatch.convert.hf_config import hf_config_from_model, model_config_from_hf
from megapatch.convert.weight_map import (
    Kind,
    LlamaDims,
    MappingError,
    WeightMap,
    pad_vocab,
)

# The config.json files of the released checkpoints (meta-llama/Llama-2-7b-hf and
# meta-llama/Meta-Llama-3-8B), fields that matter for the weights.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
LLAMA3_8B = dict(
    LLAMA2_7B,
    intermediate_size=14336,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)
TINY_BIAS_TIED = dict(
    LLAMA2_7B,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=12,  # != hidden / heads: kv_channels
    vocab_size=300,
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
)


def _hf_meta_shapes(hf_cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes transformers saves for this config (meta device, no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # tied: not saved, transformers re-ties on load
    return shapes


def _megatron_meta_shapes(model_cfg, padded_vocab) -> tuple[dict, dict]:
    """Dist-checkpoint keys and global shapes of megatron's model (meta device)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    from megapatch.model import build_model

    assert model_cfg.padded_vocab_size(1) == padded_vocab
    with torch.device("meta"):
        [model] = build_model(
            model_cfg, ParallelConfig(), PrecisionConfig(transformer_impl="local")
        )
    assert next(model.parameters()).device.type == "meta"
    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, objects = {}, {}
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedObject):
            objects[v.key] = tuple(v.global_shape)
    return tensors, objects


@pytest.mark.parametrize(
    "name,hf_cfg", [("llama2-7b", LLAMA2_7B), ("llama3-8b", LLAMA3_8B), ("tiny", TINY_BIAS_TIED)]
)
def test_map_covers_every_tensor_of_both_libraries(single_rank, name, hf_cfg):
    model_cfg = model_config_from_hf(hf_cfg, f"{name}/config.json")
    dims = LlamaDims.from_model_config(model_cfg)
    wmap = WeightMap(dims)

    hf_shapes = _hf_meta_shapes(hf_cfg)
    ours = wmap.hf_shapes()
    assert sorted(set(hf_shapes) - set(ours)) == []  # every HF tensor is produced
    assert sorted(set(ours) - set(hf_shapes)) == []  # nothing left over
    assert ours == hf_shapes  # with its shape

    mg_tensors, mg_objects = _megatron_meta_shapes(model_cfg, dims.padded_vocab)
    assert wmap.megatron_shapes() == mg_tensors
    assert {k: (dims.num_layers,) for k in wmap.extra_state_keys()} == mg_objects

    # Each tensor belongs to exactly one rule, on each side.
    hf_names = [n for r in wmap.rules for n in r.hf_names]
    assert len(hf_names) == len(set(hf_names))
    mg_pieces = [(r.key, r.layer) for r in wmap.rules]
    assert len(mg_pieces) == len(set(mg_pieces))
    assert sum(1 for r in wmap.rules if r.key == "decoder.final_layernorm.weight") == 1


def test_full_size_numbers(single_rank):
    """The published parameter counts (6.74B and 8.03B) and the GQA geometry."""
    for cfg, params, qkv_rows in (
        (LLAMA2_7B, 6_738_415_616, 3 * 4096),
        (LLAMA3_8B, 8_030_261_248, 4096 + 2 * 1024),
    ):
        wmap = WeightMap(LlamaDims.from_model_config(model_config_from_hf(cfg, "config.json")))
        total = sum(torch.Size(s).numel() for s in wmap.hf_shapes().values())
        assert total == params
        qkv = [r for r in wmap.rules if r.kind is Kind.QKV][0]
        assert qkv.shape == (qkv_rows, 4096)


def _random_hf(wmap: WeightMap, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.randn(s, generator=gen) for n, s in wmap.hf_shapes().items()}


@pytest.mark.parametrize("groups", [1, 2, 4])  # MQA, GQA, MHA
def test_transforms_invert_each_other(groups):
    dims = LlamaDims(
        num_layers=2,
        hidden=32,
        ffn=40,
        heads=4,
        groups=groups,
        head_dim=8,
        vocab=50,
        padded_vocab=64,
        tied=False,
        bias=True,
    )
    wmap = WeightMap(dims)
    gen = torch.Generator().manual_seed(0)
    hf = _random_hf(wmap, gen)
    for rule in wmap.rules:
        mg = wmap.to_megatron(rule, hf)
        assert tuple(mg.shape) == rule.shape
        back = wmap.to_hf(rule, mg)
        assert back.keys() == set(rule.hf_names)
        for name, t in back.items():
            assert torch.equal(t, hf[name]), name
        # and the other way round, padding rows included
        mg2 = torch.randn(rule.shape, generator=gen)
        rebuilt = wmap.to_megatron(rule, wmap.to_hf(rule, mg2), padding=mg2[dims.vocab :])
        assert torch.equal(rebuilt, mg2), rule.key


def test_qkv_layout_is_grouped_per_kv_head():
    """Megatron's fused rows: per KV group g, its query heads, then k_g, then v_g."""
    dims = LlamaDims(
        num_layers=1,
        hidden=4,
        ffn=4,
        heads=4,
        groups=2,
        head_dim=1,
        vocab=4,
        padded_vocab=4,
        tied=True,
        bias=False,
    )
    wmap = WeightMap(dims)
    rule = next(r for r in wmap.rules if r.kind is Kind.QKV)
    q, k, v = (torch.arange(n, dtype=torch.float)[:, None].expand(-1, 4) for n in (4, 2, 2))
    names = rule.hf_names
    fused = wmap.to_megatron(rule, {names[0]: q, names[1]: k + 10, names[2]: v + 20})
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_vocab_padding_rows():
    real = torch.randn(10, 3)
    out = pad_vocab(real, 10, 16)
    assert torch.equal(out[:10], real)
    assert torch.allclose(out[10:], real.mean(0).expand(6, -1))
    # Re-padding keeps existing (trained) padding rows, then given rows, then means.
    grown = pad_vocab(torch.cat([real, torch.ones(2, 3)]), 10, 16, padding=torch.full((1, 3), 7.0))
    assert torch.equal(grown[10:12], torch.ones(2, 3))
    assert torch.equal(grown[12], torch.full((3,), 7.0))
    assert torch.allclose(grown[13:], real.mean(0).expand(3, -1))
    assert torch.equal(pad_vocab(grown, 10, 12), grown[:12])  # shrinking drops trailing rows
    with pytest.raises(MappingError, match="expected >= 10"):
        pad_vocab(real[:5], 10, 16)


def test_shape_mismatch_names_the_tensor():
    dims = LlamaDims(
        num_layers=1,
        hidden=8,
        ffn=8,
        heads=2,
        groups=2,
        head_dim=4,
        vocab=8,
        padded_vocab=8,
        tied=False,
        bias=False,
    )
    wmap = WeightMap(dims)
    rule = next(r for r in wmap.rules if r.kind is Kind.GATE_UP)
    with pytest.raises(MappingError, match=r"decoder.layers.mlp.linear_fc1.weight \(layer 0\)"):
        wmap.to_hf(rule, torch.zeros(8, 8))


def test_non_llama_models_are_refused():
    from tests.helpers import tiny_model

    for field, value, msg in (
        ("normalization", "LayerNorm", "normalization is LayerNorm"),
        ("swiglu", False, "swiglu is false"),
        ("position_embedding_type", "learned_absolute", "position_embedding_type"),
        ("qk_layernorm", True, "qk_layernorm"),
    ):
        with pytest.raises(MappingError, match=msg):
            LlamaDims.from_model_config(tiny_model(**{field: value}))


# ------------------------------------------------------------------------------ config.json
def test_hf_config_round_trip_and_transformers_reads_it():
    from transformers import LlamaConfig

    for hf_cfg in (LLAMA2_7B, LLAMA3_8B, TINY_BIAS_TIED):
        model_cfg = model_config_from_hf(hf_cfg, "config.json")
        out = hf_config_from_model(model_cfg, dtype="bf16", bos_token_id=1, eos_token_id=2)
        assert model_config_from_hf(out, "exported/config.json") == model_cfg
        theirs = LlamaConfig.from_dict(json.loads(json.dumps(out)))
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "rms_norm_eps",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
        ):
            assert getattr(theirs, key) == hf_cfg.get(key, False), key
        assert theirs.head_dim == hf_cfg.get(
            "head_dim", hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        )
        assert theirs.rope_parameters["rope_theta"] == hf_cfg["rope_theta"]


def test_transformers5_rope_parameters_are_read():
    cfg = dict(LLAMA3_8B)
    cfg.pop("rope_theta")
    cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert model_config_from_hf(cfg, "config.json").rotary_base == 500000


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "model_type 'mistral'"),
        (dict(model_type="gpt2"), "not a Llama model"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias=True but mlp_bias=False"),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            "RoPE scaling 'llama3'",
        ),
        (dict(rope_theta=10000.5), "rope_theta 10000.5"),
        (dict(num_key_value_heads=5), "not a multiple of num_key_value_heads"),
        (dict(hidden_size=None), "field hidden_size"),
    ],
)
def test_bad_hf_configs_name_the_field(change, message):
    with pytest.raises(ConvertError, match=message) as info:
        model_config_from_hf(dict(LLAMA2_7B, **change), "some/dir/config.json")
    assert "some/dir/config.json" in str(info.value)
