"""``megapatch ckpt info``: what a checkpoint is, from its metadata alone (no weights loaded).

Reads ``megapatch.json`` and megatron's tensor metadata (shapes and dtypes), so it is instant
even for large models and needs no process group.
"""

from __future__ import annotations

import os
from typing import Any

from megapatch.convert.common import ConvertError, human_bytes, layout_str
from megapatch.convert.dist_io import DIST_FILES, resolve_checkpoint
from megapatch.training.checkpoint import CheckpointError, list_checkpoints, read_meta

_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def checkpoint_info(path: str) -> dict[str, Any]:
    """Facts about checkpoint ``path`` (a checkpoint directory, or a root: its latest)."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = read_meta(ckpt)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    missing = [n for n in DIST_FILES if not os.path.isfile(os.path.join(ckpt, n))]
    if missing:
        raise ConvertError(f"{ckpt} is incomplete: megatron's {', '.join(missing)} missing")
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    # Tensor metadata straight from the file (no process group needed).
    tensors = TorchDistLoadShardedStrategy().load_tensors_metadata(ckpt)
    model = {k: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIXES)}
    params = sum(_numel(tuple(v.global_shape)) for v in model.values())
    cfg = meta.get("model") or {}
    vocab = cfg.get("vocab_size")
    padding = 0
    for key in _VOCAB_KEYS:
        if key in model and vocab:
            rows, hidden = model[key].global_shape[:2]
            padding += (rows - vocab) * hidden
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in model.values()})
    contents = ["model"]
    if any(k.startswith("optimizer.") for k in tensors):
        contents.append("optimizer")
    common_path = os.path.join(ckpt, "common.pt")
    if os.path.isfile(common_path):
        import torch

        common = torch.load(common_path, map_location="cpu", weights_only=False) or {}
        if "opt_param_scheduler" in common:
            contents.append("scheduler")
        sharding = (common.get("optimizer") or {}).get("param_state_sharding_type")
        if sharding and "optimizer" in contents:
            contents[contents.index("optimizer")] = f"optimizer ({sharding})"
    if any(n.startswith("rng_state") for n in _object_names(ckpt)):
        contents.append("rng")
    size = sum(
        os.path.getsize(os.path.join(ckpt, n))
        for n in os.listdir(ckpt)
        if os.path.isfile(os.path.join(ckpt, n))
    )
    root = os.path.dirname(os.path.abspath(ckpt))
    siblings = list_checkpoints(root)
    return {
        "path": ckpt,
        "root": root,
        "checkpoints_in_root": len(siblings),
        "step": meta.get("step"),
        "stage": meta.get("stage"),
        "patch_size": meta.get("patch_size"),
        "tokens_seen": meta.get("tokens_seen"),
        "consumed_samples": meta.get("consumed_samples"),
        "parallel": meta.get("parallel"),
        "layout": layout_str(meta.get("parallel")),
        "world_size": meta.get("world_size"),
        "padded_vocab_size": meta.get("padded_vocab_size"),
        "model": cfg,
        "precision": meta.get("precision"),
        "dtypes": dtypes,
        "parameters": params,
        "parameters_without_padding": params - padding,
        "contents": contents,
        "model_only": bool(meta.get("model_only")),
        "size_bytes": size,
        "tokenizer_model": meta.get("tokenizer_model"),
        "git_commit": meta.get("git_commit"),
        "imported_from": (meta.get("imported_from") or {}).get("path"),
        "resharded_from": (meta.get("resharded_from") or {}).get("path"),
    }


def _object_names(ckpt: str) -> list[str]:
    """ShardedObject keys stored in the torch_dist metadata (rng states, extra states)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(ckpt).read_metadata()
    except Exception:  # noqa: BLE001 - informational only
        return []
    return [k for k in md.state_dict_metadata if "/shard_" in k]


def format_info(info: dict[str, Any]) -> str:
    """The human-readable ``ckpt info`` report."""
    m = info["model"] or {}
    heads = m.get("num_attention_heads")
    groups = m.get("num_query_groups") or heads
    hidden = m.get("hidden_size")
    head_dim = m.get("kv_channels") or (hidden // heads if hidden and heads else None)
    ffn = m.get("ffn_hidden_size")
    if ffn is None and m:
        from megapatch.config import ModelConfig

        try:
            ffn = ModelConfig(**m).resolved_ffn_hidden_size()
        except TypeError:
            ffn = None
    arch = ", ".join(
        x
        for x in (
            f"{m.get('num_layers')} layers",
            f"hidden {hidden}",
            f"ffn {ffn}" if ffn else None,
            f"{heads} heads ({groups} query groups, head dim {head_dim})",
            m.get("normalization"),
            "SwiGLU" if m.get("swiglu") else "GELU",
            f"RoPE base {m.get('rotary_base')}"
            if m.get("position_embedding_type") == "rope"
            else "learned positions",
            "tied embeddings" if not m.get("untie_embeddings_and_output_weights", True) else None,
        )
        if x
    )
    stage = info["stage"]
    k = info["patch_size"]
    stage_s = (
        "-"
        if stage is None
        else f"{stage}"
        + (f" ({'patch level' if k and k > 1 else 'token level'}, K={k})" if k else "")
    )
    prec = info["precision"] or {}
    root_note = (
        f" (1 of {info['checkpoints_in_root']} under {info['root']})"
        if info["checkpoints_in_root"] > 1
        else ""
    )
    rows = [
        ("checkpoint", f"{info['path']}{root_note}"),
        ("step", str(info["step"])),
        ("stage", stage_s),
        ("tokens seen", _num(info["tokens_seen"])),
        ("consumed samples", str(info["consumed_samples"])),
        (
            "layout",
            f"saved at {info['layout']}"
            + (f", world size {info['world_size']}" if info.get("world_size") else "")
            + f"; padded vocab {info['padded_vocab_size']} (vocab {m.get('vocab_size')})",
        ),
        ("model", arch),
        (
            "precision",
            ("bf16" if prec.get("bf16") else "fp32")
            + (f", fp8 {prec['fp8_format']}" if prec.get("fp8_format") else "")
            + f"; stored as {'/'.join(info['dtypes'])}",
        ),
        (
            "parameters",
            f"{info['parameters']:,} "
            f"({info['parameters_without_padding']:,} without vocabulary padding)",
        ),
        ("contents", ", ".join(info["contents"])),
        ("size on disk", human_bytes(info["size_bytes"])),
        ("tokenizer", str(info["tokenizer_model"])),
        ("git commit", str(info["git_commit"])),
    ]
    if info["imported_from"]:
        rows.append(("imported from", info["imported_from"]))
    if info["resharded_from"]:
        rows.append(("resharded from", info["resharded_from"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _num(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)
