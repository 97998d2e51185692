"""Import a Hugging Face Llama checkpoint (safetensors) as a megapatch dist checkpoint.

The result is ``SAVE/iter_0000000/`` (a megatron dist checkpoint of the model only, with
``megapatch.json``: step 0, stage 0, no tokens seen) and ``SAVE/latest_checkpointed_iteration.
txt``: ``megapatch train`` loads it with ``load_checkpoint(path, chunks)`` at the target layout
(or any layout with the same vocabulary padding) and continues with patch-level training.

Only the vocabulary padding depends on the target layout (a multiple of
``make_vocab_size_divisible_by`` x TP); the padding rows come from
``megatron_vocab_padding.safetensors`` when the directory is a megapatch export (so export ->
import is exact), otherwise they are the mean of the real rows (see
:func:`~megapatch.convert.weight_map.pad_vocab`).

Streaming: the safetensors headers are checked first; tensors are then read one layer at a time
and staged to disk (see :class:`~megapatch.convert.dist_io.DistWriter`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megapatch.config import ConfigError, ParallelConfig, PrecisionConfig
from megapatch.convert.common import (
    DTYPES,
    ConvertError,
    PeakMemory,
    barrier,
    broadcast_error,
    check_output,
    dtype_name,
    ensure_world,
    git_commit,
    is_converted_root,
    is_writer,
    read_json,
    write_json,
    write_text,
)
from megapatch.convert.dist_io import DistWriter
from megapatch.convert.export import EXPORT_META, PADDING_FILE
from megapatch.convert.hf_config import model_config_from_hf
from megapatch.convert.hf_tokenizer import load_processor
from megapatch.convert.safetensors_io import load_file, open_hf_checkpoint, read_tensor
from megapatch.convert.weight_map import Kind, LlamaDims, MappingError, WeightMap
from megapatch.training.checkpoint import (
    CHECKPOINT_META,
    FORMAT_VERSION,
    LATEST_FILE,
    checkpoint_name,
)

#: Hugging Face tensors that carry no weights (old checkpoints saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ImportResult:
    """What an import wrote and measured."""

    path: str
    root: str
    parameters: int
    padded_vocab_size: int
    bytes: int
    seconds: float
    peak_rss: int | None


def check_hf_tensors(entries: dict, wmap: WeightMap, hf_dir: str, tied: bool) -> None:
    """Every tensor the map needs is present with its shape, and nothing is left over."""
    expected = wmap.hf_shapes()
    missing = [n for n in expected if n not in entries]
    if missing:
        raise ConvertError(
            f"{hf_dir} lacks {len(missing)} tensors the config implies (e.g. {missing[0]}); the "
            "checkpoint is incomplete or config.json does not describe it"
        )
    for name, shape in expected.items():
        if entries[name].shape != shape:
            raise ConvertError(
                f"{hf_dir}: tensor {name} has shape {entries[name].shape}, config.json implies "
                f"{shape}"
            )
    extra = [
        n
        for n in entries
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (tied and n == "lm_head.weight")
    ]
    if extra:
        raise ConvertError(
            f"{hf_dir} holds {len(extra)} tensors the Llama map does not use (e.g. {extra[0]}); "
            "it is not a plain Llama checkpoint"
        )


def import_from_hf(
    load: str,
    save: str,
    *,
    parallel: ParallelConfig | None = None,
    make_vocab_size_divisible_by: int = 128,
    tokenizer_model: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    report: Callable[[str], None] | None = print,
) -> ImportResult:
    """Import HF Llama directory ``load`` into checkpoint root ``save`` for layout ``parallel``.

    Collective (see :mod:`megapatch.convert.dist_io`). Every check that needs no weights runs
    first: config, shards, tensor names and shapes, tokenizer, target layout, output.
    """
    t0 = time.perf_counter()
    say = report if (report and is_writer()) else (lambda _msg: None)
    parallel = parallel or ParallelConfig()
    ensure_world()
    err: BaseException | None = None
    try:
        config_path = os.path.join(load, "config.json")
        if not os.path.isdir(load):
            raise ConvertError(f"{load} is not a directory; pass a Hugging Face model directory")
        hf = read_json(config_path, "the Hugging Face model config")
        cfg = model_config_from_hf(hf, config_path, make_vocab_size_divisible_by)
        try:
            parallel.validate(cfg)
        except ConfigError as e:
            raise ConvertError(f"target layout: {e}") from None
        tp = parallel.tensor_model_parallel_size
        dims = LlamaDims.from_model_config(cfg, cfg.padded_vocab_size(tp), where=config_path)
        wmap = WeightMap(dims)
        entries = open_hf_checkpoint(load)
        check_hf_tensors(entries, wmap, load, dims.tied)
        tok = tokenizer_model
        found = os.path.join(load, "tokenizer.model")
        if tok is None and os.path.isfile(found):
            try:
                load_processor(found)
                tok = found
            except ConvertError:  # e.g. Llama-3's tiktoken file: not for megapatch's data path
                say(f"note: {found} is not a sentencepiece model; no tokenizer recorded")
        if tok is not None:
            sp, _ = load_processor(tok)
            if sp.vocab_size() != cfg.vocab_size:
                raise ConvertError(
                    f"tokenizer {tok} has {sp.vocab_size()} pieces but {config_path} has "
                    f"vocab_size {cfg.vocab_size}; pass the model's own tokenizer "
                    "(--tokenizer-model)"
                )
        first = entries[next(iter(wmap.hf_shapes()))]
        out_dtype = first.dtype if dtype == "auto" else DTYPES[dtype]
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConvertError(f"{load}: weights are {out_dtype}; pass --dtype fp32 or bf16")
        padding_rows: dict[str, torch.Tensor] = {}
        pad_path = os.path.join(load, PADDING_FILE)
        if os.path.isfile(pad_path):
            padding_rows = load_file(pad_path)
        export_meta = (
            read_json(os.path.join(load, EXPORT_META), "megapatch export metadata")
            if os.path.isfile(os.path.join(load, EXPORT_META))
            else {}
        )
        if is_writer():
            check_output(
                save, force, "--save root", inputs=(load,), earlier_output=is_converted_root
            )
    except (ConvertError, MappingError, OSError) as e:
        err = e
    broadcast_error(err)

    final = os.path.join(save, checkpoint_name(0))
    partial = final + ".partial"
    if is_writer():
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        say(
            f"importing {load} ({dims.num_layers} layers, hidden {dims.hidden}, {dims.heads} "
            f"heads / {dims.groups} KV groups, vocab {dims.vocab} padded to {dims.padded_vocab} "
            f"for TP{tp}) -> {final} as {dtype_name(out_dtype)}"
        )
    writer = DistWriter(partial + ".staging")
    n_params = 0
    for group in wmap.groups:
        if not is_writer():
            continue
        for rule in group.rules:
            hf_tensors = {name: read_tensor(entries[name]) for name in rule.hf_names}
            pad = padding_rows.get(rule.key) if rule.kind is Kind.VOCAB else None
            tensor = wmap.to_megatron(rule, hf_tensors, padding=pad).to(out_dtype)
            n_params += tensor.numel()
            writer.add(rule.key, tensor, rule.layer, dims.num_layers)
            del hf_tensors, tensor
    for key in wmap.extra_state_keys():
        for i in range(dims.num_layers):
            writer.add_object(key, None, (dims.num_layers,), (i,))
    writer.save(partial)
    if is_writer():
        tok_copy = None
        if tok is not None:
            tok_copy = os.path.join(save, "tokenizer.model")
            shutil.copyfile(tok, tok_copy)
            tok_copy = os.path.abspath(tok_copy)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": 0,
            "complete": True,
            "stage": 0,
            "patch_size": None,
            "tokens_seen": 0,
            "consumed_samples": [],
            "model": dataclasses.asdict(cfg),
            "parallel": dataclasses.asdict(parallel),
            "precision": dataclasses.asdict(PrecisionConfig(bf16=out_dtype == torch.bfloat16)),
            "padded_vocab_size": dims.padded_vocab,
            "tokenizer_model": tok_copy,
            "git_commit": git_commit(),
            "model_only": True,
            "add_bos_token": bool(export_meta.get("add_bos_token", _hf_adds_bos(load))),
            "imported_from": {
                "format": "huggingface-llama",
                "path": os.path.abspath(load),
                "dtype": dtype_name(first.dtype),
                "megapatch_export": export_meta or None,
            },
        }
        write_json(os.path.join(partial, CHECKPOINT_META), meta)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text(os.path.join(save, LATEST_FILE), checkpoint_name(0) + "\n")
        say(f"wrote {final}: {n_params:,} parameters")
    barrier()
    return ImportResult(
        path=final,
        root=save,
        parameters=sum(_numel(s) for s in wmap.megatron_shapes().values()),
        padded_vocab_size=dims.padded_vocab,
        bytes=writer.bytes,
        seconds=time.perf_counter() - t0,
        peak_rss=PeakMemory.peak_bytes(),
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _hf_adds_bos(hf_dir: str) -> bool:
    """Whether the HF tokenizer prepends BOS (Llama's default when unspecified)."""
    path = os.path.join(hf_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return False
    try:
        cfg = read_json(path, "tokenizer config")
    except ConvertError:
        return False
    return bool(cfg.get("add_bos_token", True))
