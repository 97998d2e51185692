"""Fixtures of the data tests: one small sentencepiece model per test module, reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from megapatch.data.config import TrainTokenizerConfig
from megapatch.data.tokenizer import train_tokenizer

#: Documents with characters the small tokenizer never saw (byte fallback), odd whitespace.
ODD_DOCS = [
    "Ünïcödé: 漢字, emoji 🙂, math ∑ x² ≤ ∞.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\r\nwindows line ends\nand a NUL \x00 byte",
    "line one\n\n\nafter blank lines\n",
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    """A 512-piece BPE model trained on the first 150k characters of the pydoc topics."""
    prefix = tmp_path_factory.mktemp("tok") / "spm"
    cfg = TrainTokenizerConfig(
        input=["embedded:topics"],
        output_prefix=str(prefix),
        vocab_size=512,
        max_train_chars=150_000,
    )
    return train_tokenizer(cfg, report=lambda msg: None).model_path


@pytest.fixture(scope="module")
def sp(spm_model) -> spm.SentencePieceProcessor:
    """sentencepiece itself, the independent reference."""
    return spm.SentencePieceProcessor(model_file=spm_model)


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """JSONL with one record per line; ``raw_lines`` inserts raw bytes at given 0-based lines."""
    lines = [json.dumps(r).encode() for r in records]
    for at, raw in sorted((raw_lines or {}).items()):
        lines.insert(at, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
