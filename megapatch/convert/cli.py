"""``megapatch convert export|import|reshard`` and ``megapatch ckpt info``.

Flags follow Megatron-LM where a name exists (``--load``, ``--save``,
``--tensor-model-parallel-size``, ...). Every bad input is reported as ``error: ...`` naming
the file or flag and the fix, with exit code 2, before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

_DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from megapatch.config import ConfigError
        from megapatch.convert.common import ConvertError
        from megapatch.convert.weight_map import MappingError
        from megapatch.training.checkpoint import CheckpointError

        with warnings.catch_warnings():
            # megatron 0.16 calls torch's deprecated DCP entry points on every load
            warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
            warnings.filterwarnings("ignore", message=".*load_state_dict.*is deprecated")
            try:
                return fn(args)
            except (ConvertError, ConfigError, CheckpointError, MappingError) as err:
                return _fail(err)

    return run


def _memory(peak: int | None) -> str:
    from megapatch.convert.common import human_bytes

    return f", peak memory {human_bytes(peak)}" if peak else ""


def _export(args: argparse.Namespace) -> int:
    from megapatch.convert.common import human_bytes, parse_size
    from megapatch.convert.export import export_to_hf

    res = export_to_hf(
        args.load,
        args.save,
        tokenizer_model=args.tokenizer_model,
        dtype=args.dtype,
        max_shard_size=parse_size(args.max_shard_size),
        add_bos_token=args.add_bos_token,
        force=args.force,
    )
    print(
        f"wrote {res.path}: {res.tensors} tensors, {res.parameters:,} parameters, "
        f"{res.shards} safetensors file(s), {human_bytes(res.bytes)} in {res.seconds:.1f}s"
        f"{_memory(res.peak_rss)}"
    )
    print(f"files: {', '.join(res.files)}")
    return 0


def _parallel(args: argparse.Namespace) -> Any:
    from megapatch.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
    )


def _import(args: argparse.Namespace) -> int:
    from megapatch.convert.common import human_bytes
    from megapatch.convert.importer import import_from_hf

    res = import_from_hf(
        args.load,
        args.save,
        parallel=_parallel(args),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tokenizer_model=args.tokenizer_model,
        dtype=args.dtype,
        force=args.force,
    )
    print(
        f"imported {res.parameters:,} parameters ({human_bytes(res.bytes)}, padded vocab "
        f"{res.padded_vocab_size}) in {res.seconds:.1f}s{_memory(res.peak_rss)}"
    )
    print(f"continue training with: megapatch train ... --load {res.path}")
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from megapatch.convert.common import human_bytes
    from megapatch.convert.reshard import reshard

    res = reshard(
        args.load,
        args.save,
        _parallel(args),
        with_optimizer=not args.no_optimizer,
        force=args.force,
    )
    old, new = res.padded_vocab_size
    print(
        f"resharded {res.tensors} tensors ({human_bytes(res.bytes)}"
        f"{', with optimizer state' if res.with_optimizer else ', weights only'}; padded vocab "
        f"{old} -> {new}) in {res.seconds:.1f}s{_memory(res.peak_rss)}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from megapatch.convert.info import checkpoint_info, format_info

    info = checkpoint_info(args.dir)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _add_layout_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help=f"Tensor-parallel size the {what} is for; it sets the vocabulary padding "
        "(default: 1).",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help=f"Pipeline-parallel size the {what} is for (checked against the layer count; "
        "default: 1).",
    )
    p.add_argument(
        "--virtual-pipeline-model-parallel-size",
        type=int,
        default=None,
        help="Model chunks per pipeline rank (interleaved schedule); default: none.",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` (export, import, reshard) and ``ckpt`` (info) to the CLI."""
    conv = subparsers.add_parser(
        "convert",
        help="checkpoint conversion: Hugging Face Llama export/import, TP/PP resharding",
        description="Convert megapatch (Megatron dist) checkpoints. Each sub-command streams "
        "one layer at a time and checks its inputs before reading any weight.",
    )
    sub = conv.add_subparsers(dest="convert_command", metavar="SUBCOMMAND")
    sub.required = True

    exp = sub.add_parser(
        "export",
        help="megapatch checkpoint (any TP/PP) -> Hugging Face Llama directory",
        description="Write config.json, safetensors (sharded with an index when large), "
        "tokenizer files and generation_config.json; LlamaForCausalLM loads it unchanged.",
    )
    exp.add_argument(
        "--load",
        required=True,
        help="Checkpoint directory (iter_XXXXXXX) or checkpoint root (its latest checkpoint).",
    )
    exp.add_argument("--save", required=True, help="Output Hugging Face model directory.")
    exp.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece model to export as the tokenizer (default: the one recorded in "
        "the checkpoint's megapatch.json).",
    )
    exp.add_argument(
        "--dtype",
        choices=_DTYPE_CHOICES,
        default="auto",
        help="Weight dtype of the export; 'auto' keeps the checkpoint's (default: auto).",
    )
    exp.add_argument(
        "--max-shard-size",
        default="5GB",
        help="Largest safetensors file; bigger models are sharded with an index (default: 5GB).",
    )
    exp.add_argument(
        "--add-bos-token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Whether the exported tokenizer prepends <s>; default: as the checkpoint records "
        "(megapatch's data pipeline adds no BOS unless --prepend-bos was used).",
    )
    exp.add_argument("--force", action="store_true", help="Overwrite an existing --save.")
    exp.set_defaults(func=_guarded(_export))

    imp = sub.add_parser(
        "import",
        help="Hugging Face Llama directory (safetensors) -> megapatch checkpoint (step 0)",
        description="Write SAVE/iter_0000000 (model only) and SAVE/latest_checkpointed_"
        "iteration.txt, ready for `megapatch train --load`.",
    )
    imp.add_argument("--load", required=True, help="Hugging Face Llama model directory.")
    imp.add_argument("--save", required=True, help="Output checkpoint root.")
    _add_layout_flags(imp, "checkpoint")
    imp.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this times the tensor-parallel size "
        "(default: 128).",
    )
    imp.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece model of the checkpoint (default: LOAD/tokenizer.model when "
        "present); its size must match the config's vocab_size.",
    )
    imp.add_argument(
        "--dtype",
        choices=_DTYPE_CHOICES,
        default="auto",
        help="Stored weight dtype; 'auto' keeps the Hugging Face one. Loading casts to the "
        "training precision either way (default: auto).",
    )
    imp.add_argument("--force", action="store_true", help="Overwrite an existing --save.")
    imp.set_defaults(func=_guarded(_import))

    rsh = sub.add_parser(
        "reshard",
        help="megapatch checkpoint -> the same checkpoint for another TP/PP/VPP layout",
        description="Re-pad the vocabulary for the target tensor-parallel size and record the "
        "new layout. Checkpoints load at any layout with the same padded vocabulary already; "
        "resharding is needed when the target TP changes the padding.",
    )
    rsh.add_argument(
        "--load", required=True, help="Checkpoint directory or root (its latest checkpoint)."
    )
    rsh.add_argument("--save", required=True, help="Output checkpoint root.")
    _add_layout_flags(rsh, "resharded checkpoint")
    rsh.add_argument(
        "--no-optimizer",
        action="store_true",
        help="Write the weights only (drop optimizer and scheduler state).",
    )
    rsh.add_argument("--force", action="store_true", help="Overwrite an existing --save.")
    rsh.set_defaults(func=_guarded(_reshard))

    ckpt = subparsers.add_parser(
        "ckpt",
        help="inspect checkpoints",
        description="Inspect megapatch checkpoints without loading weights.",
    )
    csub = ckpt.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND")
    csub.required = True
    info = csub.add_parser(
        "info",
        help="stage, step, tokens seen, layout, config and parameter count of a checkpoint",
        description="Print what a checkpoint is, from its metadata only.",
    )
    info.add_argument("dir", help="Checkpoint directory, or a checkpoint root (its latest).")
    info.add_argument("--json", action="store_true", help="Print the facts as JSON.")
    info.set_defaults(func=_guarded(_info))
