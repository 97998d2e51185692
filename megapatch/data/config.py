"""Config dataclasses of the data section and their Megatron-style command-line flags.

Every field carries its help text in ``metadata["help"]`` (and optionally ``metadata["flag"]``;
otherwise ``data_path`` becomes ``--data-path``). :func:`add_arguments` turns a dataclass into
argparse flags and :func:`from_args` builds the dataclass back from the parsed namespace, so the
CLI, config files and code share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

# One flag machinery for the whole config tree (re-exported for the data CLI).
from megapatch.fields import add_arguments, arg, flag_name, from_args

__all__ = ["EMBEDDED", "add_arguments", "arg", "flag_name", "from_args"]

#: ``--input`` value selecting the embedded corpus (see :mod:`megapatch.data.corpus`).
EMBEDDED = "embedded"


class DataError(ValueError):
    """Bad data input or setting; the one-line message names the file or flag and the fix."""


@dataclass
class CorpusConfig:
    """Where raw text comes from and how it is cut into documents."""

    input: list[str] = arg(
        [EMBEDDED],
        "Corpus: files, directories, globs (.jsonl/.json/.txt/.md, optionally .gz), or "
        f"'{EMBEDDED}' (Python's own docs, no download), '{EMBEDDED}:topics', "
        f"'{EMBEDDED}:docstrings', '{EMBEDDED}:source' (the standard library's source files) or "
        f"'{EMBEDDED}:all' (topics and sources: ~2.4M tokens, for scaling studies).",
    )
    input_format: str = arg(
        "auto",
        "File format: 'auto' (from the extension), 'jsonl' (one JSON object per line) or 'text'.",
        choices=["auto", "jsonl", "text"],
    )
    json_key: str = arg("text", "JSONL: the key holding a document's text.")
    text_docs: str = arg(
        "paragraph",
        "Plain text: one document per 'file', per blank-line separated 'paragraph', or per 'line'.",
        choices=["file", "paragraph", "line"],
    )


@dataclass
class TrainTokenizerConfig(CorpusConfig):
    """Training a sentencepiece tokenizer (``megapatch train-tokenizer``)."""

    output_prefix: str | None = arg(
        None, "Writes PREFIX.model (sentencepiece) and PREFIX.vocab (human-readable)."
    )
    vocab_size: int = arg(8000, "Number of pieces (including <unk>, <s>, </s> and 256 bytes).")
    tokenizer_type: str = arg(
        "bpe", "sentencepiece model type.", flag="--tokenizer-type", choices=["bpe", "unigram"]
    )
    character_coverage: float = arg(
        0.9995, "Share of characters covered by pieces; the rest falls back to bytes."
    )
    max_train_chars: int = arg(
        100_000_000, "Train on at most this many characters (the corpus's first documents)."
    )
    workers: int = arg(2, "sentencepiece trainer threads.")
    force: bool = arg(False, "Overwrite existing output files.")


@dataclass
class PreprocessConfig(CorpusConfig):
    """Corpus to Megatron indexed dataset (``megapatch preprocess``)."""

    output_prefix: str | None = arg(
        None, "Writes PREFIX.bin and PREFIX.idx (Megatron indexed dataset) and PREFIX.meta.json."
    )
    tokenizer_model: str | None = arg(None, "sentencepiece .model file (ours or e.g. Llama-2's).")
    workers: int = arg(1, "Tokenizer worker processes.")
    append_eod: bool = arg(True, "Append the EOD token (</s>) to every document.")
    prepend_bos: bool = arg(False, "Prepend the BOS token (<s>) to every document.")
    force: bool = arg(False, "Overwrite existing output files.")
    log_interval: float = arg(30.0, "Seconds between progress lines when stderr is not a terminal.")


@dataclass
class DataConfig:
    """Training data: blend, split, seed and sample layout (consumed by the training loop)."""

    data_path: list[str] = arg(
        [],
        "Dataset prefix(es) written by 'megapatch preprocess': 'PREFIX' or a blend "
        "'W1 PREFIX1 W2 PREFIX2 ...' (no weights: weighted by token count).",
    )
    split: str = arg("969,30,1", "train,valid,test weights; documents are split in index order.")
    seed: int = arg(1234, "Seed of the per-epoch document shuffle and of the sample shuffle.")
    shuffle_samples: bool = arg(
        True,
        "Shuffle the order of samples within each training stage (seeded; each stage still "
        "reads exactly its own share of the stream). Off: consecutive windows of the stream.",
    )
    data_cache_path: str | None = arg(
        None, "Where the stream indices are cached; default: <first prefix's dir>/index-cache."
    )
    seq_length: int = arg(
        2048, "T: positions per sample (tokens in the token stage, patches in the patch stage)."
    )
    eod_mask_loss: bool = arg(False, "Mask the loss where the label is the EOD token.")
    stream_chunk_length: int = arg(
        4096, "Granularity (tokens) of the stream index and of blending several prefixes."
    )
    tokenizer_model: str | None = arg(
        None, "sentencepiece model; only needed for --eod-mask-loss without PREFIX.meta.json."
    )
    num_workers: int = arg(2, "DataLoader worker processes.")
