"""Raw text corpora: the embedded default corpus and user files (JSONL, plain text, .gz).

Embedded corpus (``--input embedded``): English prose that ships with every CPython, so no
download is needed. In this order:

* ``embedded:topics``: the 79 topics of ``pydoc_data.topics`` (the language reference pages
  behind ``help('if')``), one document each, sorted by topic name;
* ``embedded:docstrings``: one document per public standard-library module (sorted by path;
  tests, private ``_*`` modules, ``encodings``, ``lib2to3``, ``idlelib`` and site-packages
  excluded), made of the module docstring followed by each class/function/method docstring as
  ``qualified.name`` on one line, then the cleaned docstring; parts separated by blank lines.
  Sources are parsed with :mod:`ast`, never imported.

``--input embedded`` is these two parts (the demo's corpus). Two more names give a corpus
large enough for data-scaling studies without repeating data:

* ``embedded:source``: the standard-library source files themselves, one document per file
  (the same sorted files as ``embedded:docstrings``, same exclusions), read as UTF-8 exactly
  as they are on disk;
* ``embedded:all``: ``embedded:topics`` then ``embedded:source`` — every text once (the
  sources already contain the docstrings, so ``embedded:docstrings`` is left out).

The text is a pure function of the installed Python's files, so it is deterministic for a
given Python. Measured on CPython 3.11.7: 79 + 358 = 437 documents, 2,062,235 characters,
508,118 tokens (EOD included) with the default 8000-piece BPE tokenizer trained on it; reading
it takes ~5 s (parsing the sources). ``benchmarks/bench_data.py`` recomputes these figures;
other Python versions differ slightly.

``embedded:all`` on CPython 3.11.7: 79 + 394 = 473 documents, 8,282,302 characters (the
sources: 394 files, 7,817,332 characters), 2,363,482 tokens (EOD included; sources 2,233,921)
with a 4000-piece BPE tokenizer trained on it (``megapatch train-tokenizer --input embedded:all
--vocab-size 4000``, 6 s; ``megapatch preprocess --input embedded:all --workers 2``, 11 s).
Under the "98,2,0" split its train split holds 2,294,215 tokens: enough for single-epoch
budgets up to ~2.2M tokens (about 4.6x ``--input embedded``).

User files: a document is a JSONL record's ``--json-key`` string, or for plain text a whole
file, a blank-line separated paragraph (default) or a line. Text is kept exactly, except that
line ends are normalised to ``\\n`` in plain text and the blank lines between paragraphs are
dropped. Whitespace-only documents are counted and skipped. A record that cannot be read
(not UTF-8, malformed JSON, no text key, text not a string) is skipped and reported with its
file and line number; the unit containing bad bytes (a line, paragraph or file) is skipped.
"""

from __future__ import annotations

import ast
import glob
import gzip
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from megapatch.data.config import EMBEDDED, DataError

_JSONL_EXT = (".jsonl", ".json", ".ndjson")
_TEXT_EXT = (".txt", ".text", ".md", ".rst")
# --input embedded[:NAME] -> its parts, in order ("embedded" alone stays the demo's corpus).
_EMBEDDED_DEFAULT = ("topics", "docstrings")
_EMBEDDED_NAMES = {
    "topics": ("topics",),
    "docstrings": ("docstrings",),
    "source": ("source",),
    "all": ("topics", "source"),
}
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "encodings", "pydoc_data", "ensurepip"}
_EXCLUDED_DIRS |= {"site-packages", "dist-packages", "lib-dynload", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class Document:
    """One document: its text, where it came from and the line it starts on (0: not line-based)."""

    text: str
    source: str
    line: int = 0


@dataclass(frozen=True)
class Source:
    """One input: a file with its format, or an embedded part (``path`` = ``embedded:topics``)."""

    path: str
    fmt: str  # "jsonl", "text" or "embedded"


@dataclass
class SkipLog:
    """Counts skipped records by reason and reports the first ``max_reports`` with file:line."""

    report: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))
    max_reports: int = 20
    counts: Counter = field(default_factory=Counter)
    empty_documents: int = 0

    def skip(self, source: str, line: int, reason: str, fix: str = "") -> None:
        """Record (and maybe report) one skipped record."""
        self.counts[reason] += 1
        total = sum(self.counts.values())
        if total <= self.max_reports:
            self.report(f"skipped {source}:{line}: {reason}{'; ' + fix if fix else ''}")
        elif total == self.max_reports + 1:
            self.report("(further skips are counted, not reported)")

    @property
    def skipped(self) -> int:
        """Number of unreadable records skipped (empty documents not included)."""
        return sum(self.counts.values())


def _format_of(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(_JSONL_EXT):
        return "jsonl"
    if name.endswith(_TEXT_EXT):
        return "text"
    raise DataError(
        f"cannot tell the format of {path} from its extension; use one of "
        f"{', '.join(_JSONL_EXT + _TEXT_EXT)} (optionally .gz) or pass --input-format jsonl|text"
    )


def _known(path: str, input_format: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return input_format != "auto" or name.endswith(_JSONL_EXT + _TEXT_EXT)


def resolve_sources(inputs: Iterable[str], input_format: str = "auto") -> list[Source]:
    """Expand ``--input`` items (files, directories, globs, embedded parts) into sources.

    Directories (recursively) and globs keep the files with a corpus extension (all files when
    ``input_format`` is given); every list is sorted, so the order is reproducible.

    Raises :class:`DataError` for a missing path, a glob or directory without corpus files,
    or a file whose format cannot be told; nothing is read yet.
    """
    sources: list[Source] = []
    for item in inputs:
        if item == EMBEDDED or item.startswith(EMBEDDED + ":"):
            name = item[len(EMBEDDED) + 1 :]
            if item != EMBEDDED and name not in _EMBEDDED_NAMES:
                known = ", ".join(f"'{EMBEDDED}:{n}'" for n in _EMBEDDED_NAMES)
                raise DataError(
                    f"unknown embedded corpus part '{name}' in --input {item}; use "
                    f"'{EMBEDDED}' (topics + docstrings) or one of {known}"
                )
            parts = _EMBEDDED_NAMES[name] if name else _EMBEDDED_DEFAULT
            sources += [Source(f"{EMBEDDED}:{p}", "embedded") for p in parts]
            continue
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if _known(name, input_format)
            )
            if not found:
                raise DataError(f"directory {item} holds no .jsonl/.json/.txt/.md(.gz) files")
        elif glob.has_magic(item):
            matches = glob.glob(item, recursive=True)
            found = sorted(p for p in matches if os.path.isfile(p) and _known(p, input_format))
            if not found:
                raise DataError(f"--input glob {item} matches no corpus file; check the pattern")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise DataError(f"input file not found: {item}; check the --input path")
        sources += [Source(p, _format_of(p, input_format)) for p in found]
    if not sources:
        raise DataError("no --input given; pass files, directories, globs or 'embedded'")
    return sources


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def check_sources(sources: list[Source], json_key: str = "text") -> None:
    """Cheap checks before any expensive work: not every file empty, JSONL records usable.

    The first non-blank line of each JSONL file must be a JSON object holding ``json_key``
    (a wrong ``--json-key`` fails here, not after reading the corpus); later bad lines are
    skipped and reported while reading.
    """
    import json

    any_content = False
    for src in sources:
        if src.fmt == "embedded":
            any_content = True
            continue
        with _open(src.path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                any_content = True
                if src.fmt != "jsonl":
                    break
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise DataError(
                        f"{src.path}:{lineno}: first record is not valid UTF-8 JSON ({err}); "
                        "fix the file or use --input-format text for plain text"
                    ) from None
                if not isinstance(record, dict) or json_key not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{src.path}:{lineno}: no '{json_key}' key in the first record "
                        f"(has: {keys}); pass --json-key with the text field's name"
                    )
                break
    if not any_content:
        names = ", ".join(s.path for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise DataError(f"empty corpus: {names} hold no text; check --input")


def iter_documents(
    sources: list[Source],
    json_key: str = "text",
    text_docs: str = "paragraph",
    skips: SkipLog | None = None,
) -> Iterator[Document]:
    """Yield the non-empty documents of ``sources`` in order (skips go to ``skips``)."""
    skips = skips if skips is not None else SkipLog()
    for src in sources:
        if src.fmt == "embedded":
            docs: Iterator[Document] = _embedded(src.path.split(":", 1)[1])
        elif src.fmt == "jsonl":
            docs = _jsonl_documents(src.path, json_key, skips)
        else:
            docs = _text_documents(src.path, text_docs, skips)
        for doc in docs:
            if doc.text.strip():
                yield doc
            else:
                skips.empty_documents += 1


def _jsonl_documents(path: str, key: str, skips: SkipLog) -> Iterator[Document]:
    import json

    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                skips.skip(path, lineno, f"not valid UTF-8 (byte offset {err.start})")
                continue
            except json.JSONDecodeError as err:
                skips.skip(path, lineno, f"malformed JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict) or key not in record:
                skips.skip(path, lineno, f"no '{key}' key", "set --json-key if the field differs")
            elif not isinstance(record[key], str):
                skips.skip(path, lineno, f"'{key}' is a {type(record[key]).__name__}, not text")
            else:
                yield Document(record[key], path, lineno)


def _text_documents(path: str, mode: str, skips: SkipLog) -> Iterator[Document]:
    lines: list[str] = []
    start = bad = 0  # first line of the current unit; first line with bad bytes (0: none)
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line: str | None = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError:
                line = None
            if mode == "paragraph" and line is not None and not line.strip():
                yield from _finish_unit(path, mode, lines, start, bad, skips)
                lines, start, bad = [], 0, 0
                continue
            start = start or lineno
            if line is None:
                bad = bad or lineno
            else:
                lines.append(line)
            if mode == "line":
                yield from _finish_unit(path, mode, lines, start, bad, skips)
                lines, start, bad = [], 0, 0
    yield from _finish_unit(path, mode, lines, start, bad, skips)


def _finish_unit(
    path: str, mode: str, lines: list[str], start: int, bad: int, skips: SkipLog
) -> Iterator[Document]:
    if bad:
        skips.skip(path, bad, f"not valid UTF-8 ({mode} skipped)")
    elif start:
        yield Document("\n".join(lines), path, start)


# --- the embedded corpus ----------------------------------------------------------------------


def _embedded(part: str) -> Iterator[Document]:
    if part == "topics":
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield Document(topics[name], f"{EMBEDDED}:topics/{name}")
        return
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in _stdlib_modules(stdlib):
        text = _module_docstrings(path, stdlib) if part == "docstrings" else _module_source(path)
        if text:
            yield Document(text, f"{EMBEDDED}:{part}/{os.path.relpath(path, stdlib)}")


def _stdlib_modules(stdlib: str) -> list[str]:
    paths = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(
            d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith(("_", ".", "config-"))
        )
        paths += [
            os.path.join(root, n)
            for n in names
            if n.endswith(".py") and (n == "__init__.py" or not n.startswith("_"))
        ]
    return sorted(paths)


def _module_source(path: str) -> str:
    """A source file's text, exactly (stdlib sources are UTF-8; an unreadable file gives "")."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _module_docstrings(path: str, stdlib: str) -> str:
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return ""
    module = os.path.relpath(path, stdlib)[:-3].replace(os.sep, ".").removesuffix(".__init__")
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(doc)

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{node.name}"
                if doc := ast.get_docstring(node):
                    parts.append(f"{name}\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name)

    visit(tree.body, module)
    return "\n\n".join(parts)
