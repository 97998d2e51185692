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
    "megapatch.commands.demo",
    "megapatch.data.cli",
    "megapatch.convert.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="megapatch",
        description="Patch-level training for GPT models on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megapatch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
