"""The field machinery of the config tree: help text, Megatron-style flags, typed values.

Each config dataclass field is made with :func:`arg`: its metadata carries ``help`` (shown by
``--help``) and optionally ``flag`` (the Megatron-LM flag name, derived from the field name
when absent). :func:`add_arguments` turns a dataclass into argparse flags and :func:`from_args`
builds it back; :func:`coerce_field` types a value read from YAML by the field's declaration.
Kept apart from :mod:`megapatch.config` so that every config module (the data section
included) builds on it without importing the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value: the message names the field (as its flag) and the fix."""


def arg(default: Any, help: str, flag: str | None = None, **meta: Any) -> Any:  # noqa: A002
    """A dataclass field with help text, an optional explicit flag and extra metadata
    (e.g. ``choices``); lists and dicts get a fresh copy per instance."""
    metadata = {"help": help, **meta}
    if flag:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (``--num-layers`` for ``num_layers``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _arg_type(hint: Any) -> tuple[Any, bool, tuple | None]:
    """(scalar type, is_list, choices) of a type hint: int, str | None, list[str], Literal."""
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), False, choices
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return _arg_type(args[0])[0], False, _arg_type(args[0])[2]
    return hint, False, None


def _to_int(value: Any) -> int:
    """An integer from an int, an integral float (YAML ``1.0e6``) or text (``1e6``,
    ``1_000_000``); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            value = float(text)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


def _to_float(value: Any) -> float:
    """A finite float from a number or text (YAML reads ``3e-3`` as text); ValueError else."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    number = float(value.strip().replace("_", "") if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce_field(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` typed by field ``name`` of dataclass ``cls``, or ConfigError naming ``where``
    (e.g. ``recipe.yaml: optimizer.lr``), the value and the type it needs."""
    hint = typing.get_type_hints(cls)[name]
    optional = type(None) in typing.get_args(hint)
    typ, is_list, choices = _arg_type(hint)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    choices = f.metadata.get("choices", choices)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required ({_EXPECTED.get(typ, typ)})")

    def one(v: Any) -> Any:
        try:
            if typ is bool:
                if not isinstance(v, bool):
                    raise ValueError
                out = v
            elif typ is int:
                out = _to_int(v)
            elif typ is float:
                out = _to_float(v)
            elif typ is str:
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise ValueError
                out = str(v)
            else:
                out = v
        except (TypeError, ValueError):
            want = _EXPECTED.get(typ, getattr(typ, "__name__", str(typ)))
            raise ConfigError(f"{where}: expected {want}, got {v!r}") from None
        if choices and out not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")
        return out

    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(v) for v in items]
    return one(value)


def _cli_type(typ: Any) -> Any:
    """argparse ``type=``: integers and numbers accept ``1e6``, ``1_000_000``, ``3e-3``."""
    if typ is int:

        def integer(text: str) -> int:
            try:
                return _to_int(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"expected an integer: {err}") from None

        return integer
    if typ is float:

        def number(text: str) -> float:
            try:
                return _to_float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None

        return number
    return typ


def _given_once(base: type[argparse.Action]) -> type[argparse.Action]:
    """An argparse action that refuses its flag when it is given twice in one command line
    (argparse would silently keep the last one: a first ``--data-path`` would be lost)."""

    class Once(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
            seen = namespace.__dict__.setdefault("_flags_given", set())
            if self.dest in seen:
                names = "/".join(self.option_strings[:2])
                parser.error(
                    f"{names} given twice; give it once (a list takes several values after one "
                    f"flag: {self.option_strings[0]} A B)"
                )
            seen.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    Once.__name__ = f"Once{base.__name__}"
    return Once


_STORE_ONCE = _given_once(argparse._StoreAction)
_BOOL_ONCE = _given_once(argparse.BooleanOptionalAction)


def add_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    skip: tuple[str, ...] = (),
    dest_prefix: str = "",
    suppress_defaults: bool = False,
) -> None:
    """Add one flag per field of dataclass ``cls`` (help text, type, choices, default).

    ``dest_prefix`` namespaces the destinations (``model.num_layers``); with
    ``suppress_defaults`` a flag that is not given leaves no attribute, so it overrides nothing.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, is_list, choices = _arg_type(hints[f.name])
        default = f.default_factory() if callable(f.default_factory) else f.default
        kw: dict[str, Any] = {"dest": dest_prefix + f.name, "help": f.metadata["help"]}
        kw["default"] = argparse.SUPPRESS if suppress_defaults else default
        if typ is bool:
            kw["action"] = _BOOL_ONCE
        else:
            kw["action"] = _STORE_ONCE
            kw["type"] = _cli_type(typ)
            kw["nargs"] = "+" if is_list else None
            choices = f.metadata.get("choices", choices)
            if choices:
                kw["choices"] = choices
        if default is not None and typ is not bool:
            kw["help"] += f" (default: {default})"
        parser.add_argument(flag_name(f), **kw)


def from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Build dataclass ``cls`` from a namespace filled by :func:`add_arguments`."""
    names = [f.name for f in dataclasses.fields(cls) if f.name in vars(namespace)]
    return cls(**{name: getattr(namespace, name) for name in names})
