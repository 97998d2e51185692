"""Corpus -> Megatron indexed dataset (PREFIX.bin / PREFIX.idx) plus PREFIX.meta.json.

One sequence per document: its sentencepiece ids, then EOD (``</s>``), optionally BOS first.
The main process reads the corpus; ``--workers`` processes tokenize batches of documents and
the results are written in corpus order, so the output does not depend on the worker count.
Files are written under temporary names and renamed at the end; existing outputs are refused
without ``--force``. Every check that needs no tokenizing runs before any work starts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import sentencepiece as spm

from megapatch.data.config import DataError, PreprocessConfig, add_arguments, from_args
from megapatch.data.corpus import Document, SkipLog, check_sources, iter_documents, resolve_sources
from megapatch.data.tokenizer import Tokenizer

_BATCH_DOCS, _BATCH_CHARS = 512, 1 << 20


@dataclass
class PreprocessStats:
    """What a preprocessing run wrote."""

    output_prefix: str
    documents: int
    tokens: int
    characters: int
    empty_documents: int
    skipped: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Throughput over the whole run."""
        return self.tokens / max(self.seconds, 1e-9)


# --- worker side (kept free of megatron imports so spawned workers start fast) ----------------

_WORKER: dict = {}


def _init_worker(model_bytes: bytes, dtype: str, prefix: list[int], suffix: list[int]) -> None:
    _WORKER.update(
        sp=spm.SentencePieceProcessor(model_proto=model_bytes),
        dtype=np.dtype(dtype),
        prefix=prefix,
        suffix=suffix,
    )


def _encode(texts: list[str]) -> list[np.ndarray]:
    w = _WORKER
    return [
        np.array(w["prefix"] + ids + w["suffix"], w["dtype"])
        for ids in w["sp"].encode(texts, num_threads=1)
    ]


# --- main side --------------------------------------------------------------------------------


class _Progress:
    """docs/s and tokens/s to stderr: live on a terminal, else a line every ``interval`` s
    (``interval`` <= 0: only the final line)."""

    def __init__(self, interval: float, report: Callable[[str], None] | None) -> None:
        self.live = report is None and sys.stderr.isatty()
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.interval = 0.5 if self.live else interval
        self.start = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and (self.interval <= 0 or now - self.last < self.interval):
            return
        self.last, dt = now, max(now - self.start, 1e-9)
        rates = f"{docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tokens/s"
        line = f"{docs:,} docs, {tokens:,} tokens | {rates}"
        if self.live:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            self.report(line)


def _batches(docs: Iterator[Document]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc.text)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(
    cfg: PreprocessConfig, tok: Tokenizer, batches: Iterator[list[str]], dtype: str
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Token arrays per batch, in corpus order, with at most 2 x workers batches in flight."""
    prefix = [tok.bos] if cfg.prepend_bos else []
    suffix = [tok.eod] if cfg.append_eod else []
    init = (tok.model_bytes, dtype, prefix, suffix)
    if cfg.workers <= 1:
        _init_worker(*init)
        for batch in batches:
            yield batch, _encode(batch)
        return
    with mp.get_context().Pool(cfg.workers, initializer=_init_worker, initargs=init) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode, (batch,))))
            if len(pending) >= 2 * cfg.workers:
                texts, result = pending.popleft()
                yield texts, result.get()
        while pending:
            texts, result = pending.popleft()
            yield texts, result.get()


def output_paths(prefix: str) -> tuple[str, str, str]:
    """The files a run writes for ``prefix``: .bin, .idx, .meta.json."""
    return prefix + ".bin", prefix + ".idx", prefix + ".meta.json"


def preprocess(
    cfg: PreprocessConfig, report: Callable[[str], None] | None = None
) -> PreprocessStats:
    """Tokenize ``cfg.input`` into a Megatron indexed dataset at ``cfg.output_prefix``."""
    if not cfg.output_prefix:
        raise DataError("--output-prefix is required (writes PREFIX.bin, PREFIX.idx)")
    if not cfg.tokenizer_model:
        raise DataError("--tokenizer-model is required; train one with megapatch train-tokenizer")
    paths = output_paths(cfg.output_prefix)
    for path in paths:
        if os.path.exists(path) and not cfg.force:
            raise DataError(f"{path} exists; pass --force to overwrite or choose --output-prefix")
    tok = Tokenizer(cfg.tokenizer_model)
    _ = (tok.eod if cfg.append_eod else 0, tok.bos if cfg.prepend_bos else 0)  # fail early
    sources = resolve_sources(cfg.input, cfg.input_format)
    check_sources(sources, cfg.json_key)

    with warnings.catch_warnings():  # importing megatron.core warns that TE/apex are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    tmp = [f"{p}.tmp{os.getpid()}" for p in paths]
    skips = SkipLog(report=report) if report else SkipLog()
    progress = _Progress(cfg.log_interval, report)
    docs = tokens = chars = 0
    try:
        builder = IndexedDatasetBuilder(tmp[0], dtype=dtype)
        batches = _batches(iter_documents(sources, cfg.json_key, cfg.text_docs, skips))
        for texts, arrays in _encoded(cfg, tok, batches, np.dtype(dtype).name):
            for array in arrays:
                builder.add_document(array, [array.size])
            docs += len(arrays)
            tokens += sum(a.size for a in arrays)
            chars += sum(map(len, texts))
            progress.update(docs, tokens)
        builder.finalize(tmp[1])
        if docs == 0:
            raise DataError(
                f"empty corpus: no document in {', '.join(cfg.input)} ({skips.empty_documents} "
                f"empty, {skips.skipped} unreadable); check --input and --json-key"
            )
        progress.update(docs, tokens, final=True)
        stats = PreprocessStats(
            cfg.output_prefix,
            docs,
            tokens,
            chars,
            skips.empty_documents,
            skips.skipped,
            time.perf_counter() - progress.start,
        )
        meta = {
            "format": "megapatch-indexed-v1",
            **{k: v for k, v in asdict(stats).items() if k not in ("output_prefix", "seconds")},
            "skipped_by_reason": dict(skips.counts),
            "inputs": list(cfg.input),
            "tokenizer_model": cfg.tokenizer_model,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod if cfg.append_eod else None,
            "bos_id": tok.bos if cfg.prepend_bos else None,
            "dtype": np.dtype(dtype).name,
        }
        with open(tmp[2], "w") as f:
            json.dump(meta, f, indent=2)
        for t, p in zip(tmp, paths):
            os.replace(t, p)
    finally:
        for t in tmp:
            if os.path.exists(t):
                os.remove(t)
    return stats


def run(args: argparse.Namespace) -> int:
    """Run ``preprocess`` from parsed flags; prints the summary, returns an exit code."""
    cfg = from_args(PreprocessConfig, args)
    try:
        stats = preprocess(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.output_prefix}.bin/.idx: {stats.documents:,} documents, "
        f"{stats.tokens:,} tokens ({stats.empty_documents} empty and {stats.skipped} "
        f"unreadable skipped) in {stats.seconds:.1f}s, {stats.tokens_per_second:,.0f} tokens/s"
    )
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``preprocess`` flags, shared by the CLI and tools/preprocess_data.py."""
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, PreprocessConfig)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of tools/preprocess_data.py."""
    args = build_parser().parse_args(argv)
    return run(args)
