"""Corpus readers and the embedded corpus (no tokenizer, no megatron)."""

from __future__ import annotations

import gzip
import inspect
import json
import sysconfig

import pytest

from megapatch.data.config import DataError
from megapatch.data.corpus import (
    SkipLog,
    _module_docstrings,
    _stdlib_modules,
    check_sources,
    iter_documents,
    resolve_sources,
)
from tests.data.conftest import write_jsonl


def _read(inputs, **kw):
    skips = SkipLog(report=lambda msg: reports.append(msg))
    reports: list[str] = []
    docs = list(iter_documents(resolve_sources(inputs), skips=skips, **kw))
    return docs, skips, reports


def test_embedded_topics_are_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    docs, skips, _ = _read(["embedded:topics"])
    assert [d.text for d in docs] == [topics[k] for k in sorted(topics)]
    assert docs[0].source == f"embedded:topics/{sorted(topics)[0]}"
    assert skips.skipped == 0


def test_embedded_docstrings_match_the_modules_own_docstrings():
    import json as json_module

    stdlib = sysconfig.get_paths()["stdlib"]
    modules = _stdlib_modules(stdlib)
    assert modules == sorted(modules) == _stdlib_modules(stdlib)  # deterministic order
    assert not any("/test/" in m or "/_" in m.replace("/__init__", "") for m in modules)
    text = _module_docstrings(f"{stdlib}/json/__init__.py", stdlib)
    assert text.startswith(inspect.cleandoc(json_module.__doc__))
    assert f"json.dumps\n{inspect.cleandoc(json_module.dumps.__doc__)}" in text
    assert "json.JSONDecoder" not in text  # imported names are not documented twice
    assert _module_docstrings(f"{stdlib}/json/__init__.py", stdlib) == text


def test_unknown_embedded_part_is_an_error():
    with pytest.raises(DataError, match="unknown embedded corpus part 'wiki'"):
        resolve_sources(["embedded:wiki"])


def test_jsonl_records_bad_lines_reported_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"text": "first"}, {"text": "  "}, {"body": "no key"}, {"text": 7}, {"text": "last"}],
        raw_lines={1: b'{"text": "caf\xe9"}', 3: b'{"text": "unterminated', 4: b""},
    )
    docs, skips, reports = _read([str(path)])
    assert [(d.text, d.line) for d in docs] == [("first", 1), ("last", 8)]
    assert skips.empty_documents == 1
    assert skips.skipped == 4
    assert reports[0].startswith(f"skipped {path}:2: not valid UTF-8")
    assert reports[1].startswith(f"skipped {path}:4: malformed JSON")
    assert reports[2] == f"skipped {path}:6: no 'text' key; set --json-key if the field differs"
    assert reports[3] == f"skipped {path}:7: 'text' is a int, not text"


def test_json_key_is_configurable(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"content": "a"}, {"content": "b"}])
    docs, _, _ = _read([str(path)], json_key="content")
    assert [d.text for d in docs] == ["a", "b"]


def test_text_modes_and_line_end_normalisation(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"p1 a\r\np1 b\n\n\np2 \xff bad\np2 more\n\np3\n")
    docs, skips, reports = _read([str(path)])
    assert [(d.text, d.line) for d in docs] == [("p1 a\np1 b", 1), ("p3", 8)]
    assert reports == [f"skipped {path}:5: not valid UTF-8 (paragraph skipped)"]
    docs, _, reports = _read([str(path)], text_docs="line")
    assert [d.text for d in docs] == ["p1 a", "p1 b", "p2 more", "p3"]
    assert reports == [f"skipped {path}:5: not valid UTF-8 (line skipped)"]
    good = tmp_path / "g.md"
    good.write_text("a\n\nb\n")
    docs, _, _ = _read([str(good)], text_docs="file")
    assert [(d.text, d.line) for d in docs] == [("a\n\nb", 1)]
    docs, _, reports = _read([str(path)], text_docs="file")
    assert docs == [] and reports == [f"skipped {path}:5: not valid UTF-8 (file skipped)"]


def test_gzip_directories_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from gz"}) + "\n")
    (tmp_path / "d" / "sub" / "a.txt").write_text("from txt\n")
    (tmp_path / "d" / "notes.csv").write_text("ignored in directories\n")
    by_dir = resolve_sources([str(tmp_path / "d")])
    assert [(s.path.rsplit("/", 1)[1], s.fmt) for s in by_dir] == [
        ("b.jsonl.gz", "jsonl"),
        ("a.txt", "text"),
    ]
    by_glob = resolve_sources([str(tmp_path / "d" / "**" / "*.*")])  # .csv left out
    assert by_glob == sorted(by_dir, key=lambda s: s.path)
    assert len(resolve_sources([str(tmp_path / "d" / "*.csv")], input_format="text")) == 1
    docs = list(iter_documents(by_dir))
    assert [d.text for d in docs] == ["from gz", "from txt"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing.jsonl"), "input file not found: .*missing.jsonl; check"),
        (lambda p: str(p / "*.nothing"), "matches no corpus file"),
        (lambda p: str(p), "holds no .jsonl"),
        (lambda p: (p / "x.csv").write_text("a") and str(p / "x.csv"), "--input-format"),
    ],
)
def test_bad_inputs_fail_before_reading(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        resolve_sources([make(tmp_path)])


def test_preflight_empty_corpus_and_first_record(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "e.txt").write_bytes(b"\n\n")
    with pytest.raises(DataError, match="empty corpus: .*e.jsonl.*check --input"):
        check_sources(resolve_sources([str(tmp_path / "e.jsonl"), str(tmp_path / "e.txt")]))
    path = write_jsonl(tmp_path / "k.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"k.jsonl:1: no 'text' key .*\(has: body\).*--json-key"):
        check_sources(resolve_sources([str(path)]))
    check_sources(resolve_sources([str(path)]), json_key="body")
    bad = tmp_path / "m.jsonl"
    bad.write_bytes(b"\n{not json\n")
    with pytest.raises(DataError, match="m.jsonl:2: first record is not valid UTF-8 JSON"):
        check_sources(resolve_sources([str(bad)]))


def test_embedded_source_is_every_stdlib_module_file_exactly():
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, skips, _ = _read(["embedded:source"])
    expected = []
    for path in _stdlib_modules(stdlib):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.strip():
            expected.append((f"embedded:source/{path[len(stdlib) + 1 :]}", text))
    assert [(d.source, d.text) for d in docs] == expected
    assert len(docs) > 300 and skips.skipped == 0
    import json as json_module

    with open(json_module.__file__, encoding="utf-8") as f:
        assert f.read() in [d.text for d in docs]


def test_embedded_names_keep_the_demo_corpus_and_add_all():
    def parts(name):
        return [s.path for s in resolve_sources([name])]

    assert parts("embedded") == ["embedded:topics", "embedded:docstrings"]  # the demo's corpus
    assert parts("embedded:all") == ["embedded:topics", "embedded:source"]  # each text once
    assert parts("embedded:source") == ["embedded:source"]
