"""Preprocessing into Megatron indexed datasets, checked against sentencepiece and the raw text."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from megapatch.data import cli as data_cli
from megapatch.data import preprocess as pre
from megapatch.data.config import DataError, PreprocessConfig
from megapatch.data.corpus import iter_documents, resolve_sources
from tests.data.conftest import ODD_DOCS, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]) for i in range(len(ds))], ds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A JSONL corpus: 30 pydoc topics, odd texts, empty texts and 3 unreadable lines."""
    topics = [d.text for d in iter_documents(resolve_sources(["embedded:topics"]))][:30]
    texts = topics[:10] + ODD_DOCS + topics[10:]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    records[3:3] = [{"text": ""}, {"text": " \n "}]
    path = write_jsonl(
        tmp_path_factory.mktemp("corpus") / "c.jsonl",
        records,
        raw_lines={1: b'{"text": "\xff\xfe"}', 7: b"{oops", 9: b'{"id": 3}'},
    )
    return path, texts


def _run(tmp_path, corpus_path, spm_model, name="out", **kw) -> tuple[pre.PreprocessStats, str]:
    prefix = str(tmp_path / name)
    report = kw.pop("report", lambda msg: None)
    cfg = PreprocessConfig(
        input=[str(corpus_path)], output_prefix=prefix, tokenizer_model=spm_model, **kw
    )
    return pre.preprocess(cfg, report=report), prefix


def test_documents_match_sentencepiece_and_detokenize_to_the_input(tmp_path, corpus, spm_model, sp):
    path, texts = corpus
    reports: list[str] = []
    stats, prefix = _run(tmp_path, path, spm_model, report=reports.append)
    seqs, ds = _indexed(prefix)
    assert len(seqs) == len(texts) == stats.documents
    assert ds.index.dtype == np.uint16  # Megatron's optimal dtype for a small vocabulary
    for seq, text in zip(seqs, texts):
        assert seq.tolist() == sp.encode(text) + [sp.eos_id()]
        assert sp.decode(seq[:-1].tolist()) == text
    assert stats.tokens == sum(map(len, seqs)) == int(ds.sequence_lengths.sum())
    assert stats.characters == sum(map(len, texts))
    assert (stats.empty_documents, stats.skipped) == (2, 3)
    assert [r.split(": ")[0] for r in reports[:3]] == [f"skipped {path}:{n}" for n in (2, 8, 10)]
    assert "tokens/s" in reports[-1] and "docs/s" in reports[-1]
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    assert meta["eod_id"] == 2 and meta["documents"] == len(texts) and meta["skipped"] == 3
    assert meta["skipped_by_reason"]["no 'text' key"] == 1


def test_output_does_not_depend_on_worker_count(tmp_path, corpus, spm_model):
    _, one = _run(tmp_path, corpus[0], spm_model, name="w1", workers=1)
    _, two = _run(tmp_path, corpus[0], spm_model, name="w2", workers=2)
    for ext in (".bin", ".idx"):
        assert Path(one + ext).read_bytes() == Path(two + ext).read_bytes()


def test_bos_and_eod_options(tmp_path, corpus, spm_model, sp):
    path, texts = corpus
    _, prefix = _run(tmp_path, path, spm_model, prepend_bos=True, append_eod=False)
    seqs, _ = _indexed(prefix)
    assert seqs[0].tolist() == [sp.bos_id()] + sp.encode(texts[0])


def test_existing_output_refused_before_any_reading(tmp_path, corpus, spm_model, monkeypatch):
    _, prefix = _run(tmp_path, corpus[0], spm_model)
    before = Path(prefix + ".bin").read_bytes()
    monkeypatch.setattr(pre, "iter_documents", lambda *a, **k: pytest.fail("read the corpus"))
    with pytest.raises(DataError, match=r"out.bin exists; pass --force"):
        _run(tmp_path, corpus[0], spm_model)
    assert Path(prefix + ".bin").read_bytes() == before
    monkeypatch.undo()
    stats, _ = _run(tmp_path, corpus[0], spm_model, force=True)
    assert stats.documents == len(corpus[1])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: str(p / "missing.jsonl"), "input file not found"),
        (lambda p: (p / "e.txt").write_text("\n\n") and str(p / "e.txt"), "empty corpus"),
        (lambda p: str(write_jsonl(p / "k.jsonl", [{"body": "x"}])), "k.jsonl:1: no 'text' key"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, spm_model, monkeypatch, setup, message):
    monkeypatch.setattr(pre, "iter_documents", lambda *a, **k: pytest.fail("read the corpus"))
    with pytest.raises(DataError, match=message):
        _run(tmp_path, setup(tmp_path), spm_model)
    assert list(tmp_path.glob("out*")) == []


def test_bad_tokenizer_fails_before_any_work(tmp_path, corpus):
    with pytest.raises(DataError, match="tokenizer model not found"):
        _run(tmp_path, corpus[0], str(tmp_path / "none.model"))


def test_corpus_of_empty_documents_leaves_no_output(tmp_path, spm_model):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError, match=r"empty corpus: .*\(2 empty, 0 unreadable\)"):
        _run(tmp_path, path, spm_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_text_and_gzip_inputs(tmp_path, spm_model, sp):
    import gzip

    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("para one\nstill one\n\npara two\n")
    _, prefix = _run(tmp_path, tmp_path / "a.txt.gz", spm_model)
    seqs, _ = _indexed(prefix)
    assert [sp.decode(s[:-1].tolist()) for s in seqs] == ["para one\nstill one", "para two"]


def test_cli_subcommands_and_tools_script(tmp_path, corpus, spm_model, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="megapatch")
    data_cli.register(parser.add_subparsers())
    out = str(tmp_path / "cli")
    args = parser.parse_args(
        ["preprocess", "--input", str(corpus[0]), "--tokenizer-model", spm_model]
        + ["--output-prefix", out, "--workers", "2", "--log-interval", "0"]
    )
    assert args.func(args) == 0
    assert f"wrote {out}.bin/.idx: {len(corpus[1])} documents" in capsys.readouterr().out
    assert args.func(args) == 2  # refuses to clobber
    assert "error: " in capsys.readouterr().err

    tok_args = parser.parse_args(
        ["train-tokenizer", "--input", "embedded:topics", "--vocab-size", "400"]
        + ["--max-train-chars", "50000", "--output-prefix", str(tmp_path / "t")]
    )
    assert tok_args.func(tok_args) == 0 and (tmp_path / "t.model").exists()
    assert "400 pieces" in capsys.readouterr().out

    script = str(REPO / "tools" / "preprocess_data.py")
    argv = [script, "--input", str(corpus[0]), "--tokenizer-model", spm_model]
    monkeypatch.setattr(sys, "argv", argv + ["--output-prefix", str(tmp_path / "tool")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 0
    assert (tmp_path / "tool.bin").read_bytes() == Path(out + ".bin").read_bytes()
