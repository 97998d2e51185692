"""``megapatch train-tokenizer`` and ``megapatch preprocess``."""

from __future__ import annotations

import argparse
import sys

from megapatch.data import preprocess
from megapatch.data.config import DataError, TrainTokenizerConfig, add_arguments, from_args


def _train_tokenizer(args: argparse.Namespace) -> int:
    from megapatch.data.tokenizer import train_tokenizer

    try:
        result = train_tokenizer(from_args(TrainTokenizerConfig, args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.model_path}: {result.vocab_size} pieces, trained on "
        f"{result.documents:,} documents ({result.characters:,} characters, "
        f"{result.skipped} unreadable records skipped)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data sub-commands to the ``megapatch`` parser."""
    tok = subparsers.add_parser(
        "train-tokenizer",
        help="train a sentencepiece tokenizer on a corpus (default: the embedded one)",
        description="Train a lossless sentencepiece tokenizer (byte fallback, no normalisation).",
    )
    add_arguments(tok, TrainTokenizerConfig)
    tok.set_defaults(func=_train_tokenizer)
    pre = subparsers.add_parser(
        "preprocess",
        help="tokenize a corpus into a Megatron indexed dataset (.bin/.idx)",
        description=preprocess.__doc__.splitlines()[0],
    )
    preprocess.build_parser(pre)
