"""Export a megapatch dist checkpoint (saved at any TP/PP/VPP) to a Hugging Face Llama directory.

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), the tokenizer files, and two megapatch extras that
transformers ignores: ``megapatch_export.json`` (where the weights came from: step, stage,
tokens seen, layout) and, when Megatron padded the vocabulary, ``megatron_vocab_padding.
safetensors`` with the padding rows, so that importing the export back restores the checkpoint
bit for bit.

Streaming: the shapes come from the checkpoint metadata, the safetensors headers are written
first, and the weights are loaded one layer at a time and appended (peak memory ~ one layer).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megapatch.convert.common import (
    DTYPES,
    ConvertError,
    PeakMemory,
    barrier,
    broadcast_error,
    check_output,
    dtype_name,
    ensure_world,
    is_writer,
    layout_str,
    replace_dir,
    write_json,
)
from megapatch.convert.dist_io import DistCheckpoint, Request
from megapatch.convert.hf_config import (
    generation_config,
    hf_config_from_model,
    model_config_from_meta,
)
from megapatch.convert.hf_tokenizer import load_processor, special_token_ids, write_tokenizer_files
from megapatch.convert.safetensors_io import ShardedSafetensorsWriter, save_file
from megapatch.convert.weight_map import LAYER_PREFIX, Kind, LlamaDims, MappingError, WeightMap

PADDING_FILE = "megatron_vocab_padding.safetensors"
EXPORT_META = "megapatch_export.json"


@dataclass
class ExportResult:
    """What an export wrote and measured."""

    path: str
    checkpoint: str
    tensors: int
    parameters: int
    shards: int
    bytes: int
    files: list[str]
    seconds: float
    peak_rss: int | None


def check_checkpoint(ckpt: DistCheckpoint, wmap: WeightMap) -> None:
    """Every tensor the map needs is in the checkpoint with its shape; nothing unmapped."""
    expected = wmap.megatron_shapes()
    where = ckpt.path
    for key, shape in expected.items():
        if key not in ckpt.tensors:
            raise ConvertError(
                f"{where} has no tensor {key}; the checkpoint is incomplete or its "
                "megapatch.json does not describe it"
            )
        if ckpt.shape(key) != shape:
            raise ConvertError(
                f"{where}: tensor {key} has shape {ckpt.shape(key)}, but megapatch.json's model "
                f"config implies {shape}"
            )
    model_keys = {
        k
        for k in ckpt.tensors
        if k.startswith((LAYER_PREFIX, "embedding.", "output_layer.", "decoder."))
    }
    unmapped = sorted(model_keys - set(expected))
    if unmapped:
        raise ConvertError(
            f"{where} holds model tensors the Llama map does not cover ({', '.join(unmapped[:3])}"
            f"{'...' if len(unmapped) > 3 else ''}); this architecture cannot be exported as Llama"
        )


def export_to_hf(
    load: str,
    save: str,
    *,
    tokenizer_model: str | None = None,
    dtype: str = "auto",
    max_shard_size: int = 5 * 10**9,
    add_bos_token: bool | None = None,
    force: bool = False,
    report: Callable[[str], None] | None = print,
) -> ExportResult:
    """Export checkpoint ``load`` (a checkpoint dir or a root: its latest) to HF dir ``save``.

    Collective (see :mod:`megapatch.convert.dist_io`). All checks that need no weights run
    first: a bad checkpoint, tokenizer or output fails before anything is loaded.
    """
    t0 = time.perf_counter()
    say = report if (report and is_writer()) else (lambda _msg: None)
    ensure_world()
    err: BaseException | None = None
    try:
        ckpt = DistCheckpoint(load)
        meta = ckpt.meta
        source = os.path.join(ckpt.path, "megapatch.json")
        cfg = model_config_from_meta(meta, source)
        vocab_key = "embedding.word_embeddings.weight"
        if vocab_key not in ckpt.tensors:
            raise ConvertError(f"{ckpt.path} has no tensor {vocab_key}; not a GPT checkpoint")
        padded = ckpt.shape(vocab_key)[0]
        recorded = meta.get("padded_vocab_size")
        if recorded is not None and recorded != padded:
            raise ConvertError(
                f"{source}: padded_vocab_size {recorded} but the stored embedding has {padded} "
                "rows; the metadata does not belong to these weights"
            )
        try:
            dims = LlamaDims.from_model_config(cfg, padded, where=f"{source}: model")
        except MappingError as e:
            raise ConvertError(str(e)) from None
        wmap = WeightMap(dims)
        check_checkpoint(ckpt, wmap)
        tok = tokenizer_model if tokenizer_model is not None else meta.get("tokenizer_model")
        if tok:
            if not os.path.isfile(tok):
                raise ConvertError(
                    f"tokenizer model {tok} (from "
                    f"{'--tokenizer-model' if tokenizer_model else source}) not found; pass "
                    "--tokenizer-model PATH"
                )
            sp, _ = load_processor(tok)
            if sp.vocab_size() != cfg.vocab_size:
                raise ConvertError(
                    f"tokenizer {tok} has {sp.vocab_size()} pieces but the model's vocab_size "
                    f"is {cfg.vocab_size} ({source}); pass the tokenizer the model was trained "
                    "with (--tokenizer-model)"
                )
        stored = ckpt.dtype(vocab_key)
        out_dtype = stored if dtype == "auto" else DTYPES[dtype]
        if is_writer():
            check_output(
                save,
                force,
                "--save directory",
                inputs=(load, ckpt.path),
                earlier_output=lambda p: os.path.isfile(os.path.join(p, EXPORT_META)),
            )
    except (ConvertError, OSError) as e:
        err = e
    broadcast_error(err)

    partial = save.rstrip("/") + ".partial"
    writer = None
    padding: dict[str, torch.Tensor] = {}
    if is_writer():
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        plan = [(name, shape, out_dtype) for name, shape in wmap.hf_shapes().items()]
        writer = ShardedSafetensorsWriter(partial, plan, max_shard_size)
        say(
            f"exporting {ckpt.path} (step {meta.get('step')}, saved at "
            f"{layout_str(meta.get('parallel'))}) -> {save}: {len(plan)} tensors, "
            f"{len(writer.files)} safetensors file(s), {dtype_name(out_dtype)}"
        )
    for group in wmap.groups:
        loaded = ckpt.load([Request(r.key, r.layer) for r in group.rules])
        _refuse_non_finite(loaded, ckpt.path, partial if writer is not None else None)
        if writer is None:
            continue
        for rule in group.rules:
            tensor = loaded[Request(rule.key, rule.layer)]
            for name, t in wmap.to_hf(rule, tensor).items():
                writer.write(name, t.to(out_dtype))
            if rule.kind is Kind.VOCAB and dims.padded_vocab > dims.vocab:
                padding[rule.key] = tensor[dims.vocab :].clone()
        del loaded
    files: list[str] = []
    nbytes = 0
    if writer is not None:
        weight_map = writer.close()
        files = sorted(set(weight_map.values()))
        nbytes = writer.total_size
        if padding:
            save_file(padding, os.path.join(partial, PADDING_FILE))
            files.append(PADDING_FILE)
        ids = special_token_ids(tok) if tok else {"bos": None, "eos": None, "pad": None}
        bos = meta.get("add_bos_token") if add_bos_token is None else add_bos_token
        write_json(
            os.path.join(partial, "config.json"),
            hf_config_from_model(
                cfg,
                dtype=dtype_name(out_dtype),
                bos_token_id=ids["bos"],
                eos_token_id=ids["eos"],
                pad_token_id=ids["pad"],
            ),
        )
        write_json(
            os.path.join(partial, "generation_config.json"),
            generation_config(ids["bos"], ids["eos"]),
        )
        files += ["config.json", "generation_config.json"]
        if tok:
            files += write_tokenizer_files(
                tok, partial, add_bos_token=bool(bos), model_max_length=cfg.max_position_embeddings
            )
        else:
            say(
                "note: no tokenizer model recorded or given (--tokenizer-model): no tokenizer files"
            )
        write_json(
            os.path.join(partial, EXPORT_META),
            {
                "source_checkpoint": os.path.abspath(ckpt.path),
                "step": meta.get("step"),
                "stage": meta.get("stage"),
                "patch_size": meta.get("patch_size"),
                "tokens_seen": meta.get("tokens_seen"),
                "parallel": meta.get("parallel"),
                "padded_vocab_size": dims.padded_vocab,
                "vocab_size": dims.vocab,
                "git_commit": meta.get("git_commit"),
                "add_bos_token": bool(bos),
            },
        )
        files.append(EXPORT_META)
        replace_dir(partial, save)  # an existing --save (with --force) is replaced
    barrier()
    result = ExportResult(
        path=save,
        checkpoint=ckpt.path,
        tensors=len(wmap.hf_shapes()),
        parameters=sum(_numel(s) for s in wmap.hf_shapes().values()),
        shards=len([f for f in files if f.startswith("model")]),
        bytes=nbytes,
        files=sorted(files),
        seconds=time.perf_counter() - t0,
        peak_rss=PeakMemory.peak_bytes(),
    )
    return result


def _refuse_non_finite(loaded: dict, checkpoint: str, partial: str | None) -> None:
    """Every rank checks the tensors it loaded (all ranks load the same): an export of
    NaN/Inf weights is refused, naming the tensor, and its partial output removed."""
    for request, tensor in loaded.items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
            where = request.key + (f" (layer {request.layer})" if request.layer is not None else "")
            raise ConvertError(
                f"{checkpoint}: {where} holds {bad:,} NaN/Inf values of {tensor.numel():,}; "
                "refusing to export a non-finite model: export an earlier checkpoint"
            )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
