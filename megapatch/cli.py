"""The `megapatch` command line: one sub-command per module, each registering its own parser.

A command module exposes ``register(subparsers) -> None`` which adds its sub-parser and sets
``func`` (called with the parsed namespace, returning an exit code). Modules are imported lazily
so that ``megapatch --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order they appear in --help.
_COMMAND_MODULES: list[str] = [
    "megapatch.commands.train",
    "megapatch.commands.plan",
    "megapatch.commands.demo",
    "megapatch.data.cli",
    "megapatch.convert.cli",
    "megapatch.commands.study",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="megapatch",
        description="Patch-level training for GPT models on Megatron-Core.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """A flag must be spelled out everywhere: argparse would take ``--patch-s`` for
    ``--patch-size`` silently (and a future ``--patch-s...`` flag would change its meaning)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megapatch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
