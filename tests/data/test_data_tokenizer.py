"""Tokenizer training and loading, checked against sentencepiece itself."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from megapatch.data.config import DataError, TrainTokenizerConfig
from megapatch.data.corpus import iter_documents, resolve_sources
from megapatch.data.tokenizer import (
    Tokenizer,
    _required_pieces,
    _sentences,
    padded_vocab_size,
    train_tokenizer,
)
from tests.data.conftest import ODD_DOCS

SLICE = 150_000  # characters of the pydoc topics used for the small models


def _cfg(tmp_path, **kw) -> TrainTokenizerConfig:
    kw.setdefault("input", ["embedded:topics"])
    kw.setdefault("max_train_chars", SLICE)
    return TrainTokenizerConfig(output_prefix=str(tmp_path / "m"), **kw)


def _raw_train(sentences, vocab_size, model_type="bpe") -> None:
    """sentencepiece's own trainer with our options: the reference for vocabulary bounds."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=io.BytesIO(),
        model_type=model_type,
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16016,
        minloglevel=2,
    )


def test_trained_model_layout_and_exact_round_trip(spm_model, sp):
    tok = Tokenizer(spm_model)
    assert tok.vocab_size == sp.vocab_size() == 512
    assert (sp.unk_id(), tok.bos, tok.eod, sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(2) == "</s>" and sp.id_to_piece(3) == "<0x00>"
    docs = [d.text for d in iter_documents(resolve_sources(["embedded:topics"]))][-5:]
    for text in docs + ODD_DOCS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text  # lossless: identity normaliser + byte fallback
    assert tok.encode_batch(ODD_DOCS) == [sp.encode(t) for t in ODD_DOCS]
    assert tok.eod not in tok.encode("</s> is plain text here")


def test_training_is_deterministic(tmp_path, spm_model):
    again = train_tokenizer(_cfg(tmp_path, vocab_size=512))
    assert open(again.model_path, "rb").read() == open(spm_model, "rb").read()
    assert again.documents > 0 and again.characters == SLICE
    vocab_lines = (tmp_path / "m.vocab").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(vocab_lines) == 512 and vocab_lines[2].startswith("</s>\t")
    assert all(line.count("\t") == 1 for line in vocab_lines)  # control characters escaped


def test_unigram_model(tmp_path):
    result = train_tokenizer(_cfg(tmp_path, vocab_size=600, tokenizer_type="unigram"))
    sp = spm.SentencePieceProcessor(model_file=result.model_path)
    assert sp.vocab_size() == 600 and sp.decode(sp.encode(ODD_DOCS[0])) == ODD_DOCS[0]


@pytest.mark.parametrize(
    ("vocab", "multiple", "tp", "padded"),
    [(512, 128, 1, 512), (8000, 128, 1, 8064), (8000, 128, 2, 8192), (32000, 128, 8, 32768)],
)
def test_vocab_padding_as_megatron(vocab, multiple, tp, padded, spm_model):
    assert padded_vocab_size(vocab, multiple, tp) == padded
    assert padded % (multiple * tp) == 0 and padded - vocab < multiple * tp
    assert Tokenizer(spm_model).padded_vocab_size(multiple, tp) == padded_vocab_size(
        512, multiple, tp
    )


def test_vocab_lower_bound_matches_sentencepiece(tmp_path):
    docs = (d.text for d in iter_documents(resolve_sources(["embedded:topics"])))
    sentences, _, _ = _sentences(docs, SLICE)
    needed = _required_pieces(sentences, 0.9995)
    with pytest.raises(RuntimeError, match="smaller than required_chars"):
        _raw_train(sentences, needed - 1)
    _raw_train(sentences, needed)  # sentencepiece accepts exactly our bound
    with pytest.raises(
        DataError, match=f"--vocab-size {needed - 1} is too small .* {needed} pieces"
    ):
        train_tokenizer(_cfg(tmp_path, vocab_size=needed - 1))
    assert not (tmp_path / "m.model").exists()


def test_vocab_too_large_names_the_supported_maximum(tmp_path):
    with pytest.raises(DataError, match=r"--vocab-size 100000 is more .*at most (\d+)") as err:
        train_tokenizer(_cfg(tmp_path, vocab_size=100_000, max_train_chars=20_000))
    maximum = int(err.value.args[0].split("at most ")[1].split()[0])
    result = train_tokenizer(_cfg(tmp_path, vocab_size=maximum, max_train_chars=20_000))
    assert result.vocab_size == maximum


def test_cheap_checks_come_first(tmp_path):
    (tmp_path / "m.model").write_bytes(b"x")
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"m.model exists; pass --force"):
        train_tokenizer(_cfg(tmp_path, input=[missing], vocab_size=1))
    with pytest.raises(DataError, match="--vocab-size 200 is too small: 3 special and 256 byte"):
        train_tokenizer(_cfg(tmp_path, input=[missing], vocab_size=200, force=True))
    with pytest.raises(DataError, match="input file not found"):
        train_tokenizer(_cfg(tmp_path, input=[missing], force=True))


def test_loading_bad_models(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found: .*check --tokenizer-model"):
        Tokenizer(tmp_path / "absent.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_foreign_model_without_eos(tmp_path):
    """A model from elsewhere (here: sentencepiece defaults, no </s>) loads; EOD is refused."""
    docs = [d.text for d in iter_documents(resolve_sources(["embedded:topics"]))][:5]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_prefix=str(tmp_path / "foreign"),
        vocab_size=200,
        eos_id=-1,
        minloglevel=2,
    )
    tok = Tokenizer(tmp_path / "foreign.model")
    assert tok.decode(tok.encode("plain   words")) == "plain words"  # its NFKC folds spaces
    with pytest.raises(DataError, match="has no </s> piece"):
        _ = tok.eod
