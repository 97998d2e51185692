"""sentencepiece tokenizers: train one on a corpus, or load any existing model (Llama-2's too).

Models trained here are lossless: identity normalisation, no whitespace folding and byte
fallback, so ``decode(encode(text)) == text`` for any text. Special ids follow Llama:
``<unk>`` 0, ``<s>`` (BOS) 1, ``</s>`` 2, no pad piece. The EOD token appended to every
document is ``</s>``. Models from elsewhere apply their own normaliser (e.g. NFKC and folded
whitespace), so their round trip gives the normalised text.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import sentencepiece as spm

from megapatch.data.config import DataError, TrainTokenizerConfig
from megapatch.data.corpus import SkipLog, check_sources, iter_documents, resolve_sources

_SPECIAL = 3  # <unk>, <s>, </s>
_BYTES = 256  # byte-fallback pieces <0x00> ... <0xFF>
_SENTENCE_CHARS = 4000  # training "sentences": documents cut at line ends to at most this


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's vocabulary padding: round up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


class Tokenizer:
    """A loaded sentencepiece model with the ids the data pipeline needs."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer model not found: {path}; check --tokenizer-model")
        with open(path, "rb") as f:
            self.model_bytes = f.read()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except RuntimeError:
            raise DataError(
                f"{path} is not a sentencepiece model; pass a .model file to --tokenizer-model"
            ) from None
        self.model_path = path

    @property
    def vocab_size(self) -> int:
        """Number of pieces (unpadded)."""
        return self.sp.vocab_size()

    @property
    def eod(self) -> int:
        """End-of-document id (``</s>``)."""
        if self.sp.eos_id() < 0:
            raise DataError(f"{self.model_path} has no </s> piece to mark document ends")
        return self.sp.eos_id()

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (``<s>``)."""
        if self.sp.bos_id() < 0:
            raise DataError(f"{self.model_path} has no <s> piece; drop --prepend-bos")
        return self.sp.bos_id()

    @property
    def sha256(self) -> str:
        """Hash of the model file, recorded next to preprocessed data."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOD added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.sp.decode([int(i) for i in ids])

    def padded_vocab_size(self, divisible_by: int = 128, tp_size: int = 1) -> int:
        """Vocabulary size padded as Megatron does for tensor parallelism."""
        return padded_vocab_size(self.vocab_size, divisible_by, tp_size)


@dataclass
class TrainTokenizerResult:
    """Paths and statistics of a trained tokenizer."""

    model_path: str
    vocab_size: int
    documents: int
    characters: int
    skipped: int


def _sentences(docs: Iterator[str], max_chars: int) -> tuple[list[str], int, int]:
    """Cut documents into training sentences of <= _SENTENCE_CHARS at line ends."""
    out: list[str] = []
    n_docs = n_chars = 0
    for text in docs:
        if n_chars >= max_chars:
            break
        text = text[: max_chars - n_chars]
        n_docs, n_chars = n_docs + 1, n_chars + len(text)
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len(piece) + len(line) > _SENTENCE_CHARS:
                out.append(piece)
                piece = ""
            while len(line) > _SENTENCE_CHARS:
                out.append(line[:_SENTENCE_CHARS])
                line = line[_SENTENCE_CHARS:]
            piece += line
        if piece:
            out.append(piece)
    return out, n_docs, n_chars


def _required_pieces(sentences: list[str], coverage: float) -> int:
    """Pieces sentencepiece insists on: specials, bytes and the characters within ``coverage``.

    Same rule as sentencepiece's trainer (most frequent characters until ``coverage`` of all
    character occurrences), so a too-small vocabulary fails here, before training.
    """
    counts = Counter()
    for s in sentences:
        counts.update(s.replace(" ", "\u2581"))  # sentencepiece counts spaces as the marker
    total, kept, covered = sum(counts.values()), 0, 0
    for _, n in counts.most_common():
        if total and covered / total >= coverage:
            break
        kept, covered = kept + 1, covered + n
    return _SPECIAL + _BYTES + kept


def train_tokenizer(
    cfg: TrainTokenizerConfig, report: Callable[[str], None] | None = None
) -> TrainTokenizerResult:
    """Train a lossless sentencepiece model on ``cfg.input``; writes PREFIX.model/.vocab.

    All checks that need no training run first (output exists, vocab size bounds, corpus
    files); a vocabulary the corpus cannot fill is reported with the largest size it supports.
    """
    if not cfg.output_prefix:
        raise DataError("--output-prefix is required (writes PREFIX.model and PREFIX.vocab)")
    model_path, vocab_path = cfg.output_prefix + ".model", cfg.output_prefix + ".vocab"
    for path in (model_path, vocab_path):
        if os.path.exists(path) and not cfg.force:
            raise DataError(f"{path} exists; pass --force to overwrite or choose --output-prefix")
    if cfg.vocab_size <= _SPECIAL + _BYTES:
        raise DataError(
            f"--vocab-size {cfg.vocab_size} is too small: {_SPECIAL} special and {_BYTES} byte "
            "pieces come first; use at least a few hundred more"
        )
    sources = resolve_sources(cfg.input, cfg.input_format)
    check_sources(sources, cfg.json_key)
    skips = SkipLog(report=report) if report else SkipLog()
    docs = (d.text for d in iter_documents(sources, cfg.json_key, cfg.text_docs, skips))
    sentences, n_docs, n_chars = _sentences(docs, cfg.max_train_chars)
    if not sentences:
        raise DataError(f"empty corpus: no document in {', '.join(cfg.input)}; check --input")
    needed = _required_pieces(sentences, cfg.character_coverage)
    if cfg.vocab_size < needed:
        raise DataError(
            f"--vocab-size {cfg.vocab_size} is too small for this corpus: it needs at least "
            f"{needed} pieces; raise --vocab-size or lower --character-coverage"
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=cfg.tokenizer_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=4 * _SENTENCE_CHARS + 16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=max(1, cfg.workers),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise _vocab_error(err, cfg) from None
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    _write_atomic(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    table = "".join(
        f"{_shown(sp.id_to_piece(i))}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size())
    )
    _write_atomic(vocab_path, table.encode("utf-8"))
    return TrainTokenizerResult(model_path, sp.vocab_size(), n_docs, n_chars, skips.skipped)


def _vocab_error(err: RuntimeError, cfg: TrainTokenizerConfig) -> Exception:
    msg = str(err)
    if m := re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg
    ):
        return DataError(
            f"--vocab-size {m[1]} is more than this corpus supports (at most {m[2]} pieces with "
            f"--tokenizer-type {cfg.tokenizer_type}); use --vocab-size <= {m[2]} or more text"
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return DataError(
            f"--vocab-size {m[1]} is too small for this corpus: it needs at least {m[2]} pieces; "
            "raise --vocab-size or lower --character-coverage"
        )
    return DataError(f"sentencepiece training failed: {msg.splitlines()[-1]}")


def _shown(piece: str) -> str:
    """A piece for the .vocab listing: control characters escaped (one piece per line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in piece)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
