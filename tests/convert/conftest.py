"""Shared pieces of the conversion tests: a small tokenizer, real text, tiny training runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig


def train_small_tokenizer(prefix: str, vocab_size: int) -> str:
    """A BPE sentencepiece model trained on the pydoc topics (seconds)."""
    from megapatch.data.config import TrainTokenizerConfig
    from megapatch.data.tokenizer import train_tokenizer

    cfg = TrainTokenizerConfig(
        input=["embedded:topics"],
        output_prefix=prefix,
        vocab_size=vocab_size,
        max_train_chars=150_000,
    )
    return train_tokenizer(cfg, report=lambda msg: None).model_path


def corpus_texts(part: str = "topics", limit: int | None = None) -> list[str]:
    """Documents of the embedded corpus (Python's own docs: English prose and code)."""
    import itertools

    from megapatch.data.corpus import iter_documents, resolve_sources

    docs = (d.text for d in iter_documents(resolve_sources([f"embedded:{part}"])))
    return list(itertools.islice(docs, limit))


def text_samples(model_path: str, n: int, length: int, part: str = "topics", skip: int = 0):
    """``n`` token windows of ``length`` + 1 from the corpus (documents joined with </s>)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    stream: list[int] = []
    from megapatch.data.corpus import iter_documents, resolve_sources

    for doc in iter_documents(resolve_sources([f"embedded:{part}"])):
        stream += sp.encode(doc.text) + [sp.eos_id()]
        if len(stream) >= skip + n * (length + 1):
            break
    x = torch.tensor(stream[skip : skip + n * (length + 1)]).view(n, length + 1)
    return x


def batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs, labels, loss mask and positions of windows ``x`` [n, length + 1]."""
    tokens, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    n, s = tokens.shape
    return dict(
        tokens=tokens,
        labels=labels,
        loss_mask=torch.ones(n, s),
        position_ids=torch.arange(s).expand(n, -1).contiguous(),
    )


def checkpoint_meta(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, tokenizer: str | None
) -> dict:
    """``megapatch.json`` fields as the training loop writes them (token-level stage)."""
    return dict(
        stage=1,
        patch_size=1,
        tokens_seen=12345,
        consumed_samples=[0, 32],
        model=dataclasses.asdict(model),
        parallel=dataclasses.asdict(parallel),
        precision=dataclasses.asdict(precision),
        padded_vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
        tokenizer_model=tokenizer,
        git_commit=None,
    )


@pytest.fixture(scope="module")
def spm_500(tmp_path_factory) -> str:
    """A 500-piece tokenizer: padded to 512 by Megatron (make_vocab_size_divisible_by 128)."""
    return train_small_tokenizer(str(tmp_path_factory.mktemp("tok") / "spm500"), 500)
