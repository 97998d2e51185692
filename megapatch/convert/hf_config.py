"""Hugging Face Llama ``config.json`` <-> :class:`~megapatch.config.ModelConfig`.

Export writes the classic Llama layout (``rope_theta`` and ``rope_scaling`` at the top level,
as in the released Llama-2/Llama-3 checkpoints), which transformers 4.x and 5.x, vLLM and the
llama.cpp converters all read. Import reads that layout and transformers 5's
``rope_parameters``. Anything the model cannot represent is refused with the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megapatch.config import ModelConfig
from megapatch.convert.common import ConvertError

LLAMA_ARCHITECTURE = "LlamaForCausalLM"

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_config_from_hf(
    hf: dict[str, Any], source: str, make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    """A :class:`ModelConfig` for the Llama ``config.json`` in ``source`` (a clear error else)."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (arch and LLAMA_ARCHITECTURE not in arch):
        raise ConvertError(
            f"{source}: model_type {hf.get('model_type')!r}, architectures {arch} is not a Llama "
            f"model; only model_type 'llama' ({LLAMA_ARCHITECTURE}) converts. Models with other "
            "layouts (Mistral sliding windows, Qwen biases, Gemma norms, ...) need their own map"
        )
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ):
        if not isinstance(hf.get(name), int) or hf[name] < 1:
            raise ConvertError(f"{source}: field {name} is {hf.get(name)!r}, expected an int >= 1")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{source}: hidden_act {act!r}; Llama's SwiGLU needs 'silu'")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ConvertError(
            f"{source}: attention_bias={attention_bias} but mlp_bias={mlp_bias}; megatron has one "
            "switch (add_bias_linear) for both"
        )
    theta = _rope_theta(hf, source)
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if heads % groups:
        raise ConvertError(
            f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
            f"({groups})"
        )
    if hf.get("head_dim") is None and hf["hidden_size"] % heads:
        raise ConvertError(
            f"{source}: hidden_size ({hf['hidden_size']}) is not divisible by "
            f"num_attention_heads ({heads}) and no head_dim is given"
        )
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        add_bias_linear=attention_bias,
        position_embedding_type="rope",
        rotary_base=theta,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )


def _rope_theta(hf: dict[str, Any], source: str) -> int:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling and rope_type != "default":
        raise ConvertError(
            f"{source}: RoPE scaling {rope_type!r} (rope_scaling / rope_parameters) is not "
            "supported: megapatch's ModelConfig has no RoPE scaling, so the model would compute "
            "different positions (Llama-3.1+ 'llama3' scaling); convert a model without it"
        )
    if not math.isfinite(float(theta)) or float(theta) != int(theta) or theta <= 0:
        raise ConvertError(
            f"{source}: rope_theta {theta!r} is not a positive integer (ModelConfig.rotary_base "
            "is an int)"
        )
    return int(theta)


def hf_config_from_model(
    cfg: ModelConfig,
    *,
    dtype: str,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """``config.json`` of a Hugging Face Llama equivalent to ``cfg`` (unpadded vocabulary)."""
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    return {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.resolved_ffn_hidden_size(),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": None,
        "attention_bias": cfg.add_bias_linear,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.add_bias_linear,
        "pretraining_tp": 1,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": cfg.init_method_std,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES.get(dtype, dtype),
    }


def generation_config(bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
    """``generation_config.json``: the special ids, greedy by default."""
    return {
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "do_sample": False,
    }


def model_config_from_meta(meta: dict[str, Any], source: str) -> ModelConfig:
    """The :class:`ModelConfig` recorded in a checkpoint's ``megapatch.json``."""
    raw = meta.get("model")
    if not isinstance(raw, dict):
        raise ConvertError(f"{source}: no 'model' section; not a megapatch training checkpoint")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConvertError(
            f"{source}: model fields {unknown} are unknown to this megapatch version; "
            "convert with the version that wrote the checkpoint"
        )
    try:
        return ModelConfig(**raw)
    except TypeError as err:
        raise ConvertError(f"{source}: bad 'model' section: {err}") from None
