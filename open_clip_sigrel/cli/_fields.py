"""Command-line flags from a tool's config dataclass, so that each default and help text is written once.

A field becomes a flag when its metadata has ``help``: ``--name-with-dashes``, the type from the
annotation (``X | None`` -> X), the default from the field. A bool field defaulting to False is a
``store_true`` flag; one defaulting to True is ``--no-<name>`` (``store_false``). Metadata may add
``flag`` (another spelling), ``choices``, ``nargs`` or ``metavar``.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Config:
...     epochs: int = field(default=6, metadata={"help": "training epochs"})
...     csv: bool = field(default=True, metadata={"help": "write the CSV files"})
>>> import argparse; p = argparse.ArgumentParser(); add_config_arguments(p, Config)
>>> config_from_args(Config, p.parse_args(["--epochs", "2", "--no-csv"]))
Config(epochs=2, csv=False)
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_PASSED = ("choices", "nargs", "metavar")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _kind(hint: Any) -> tuple[Any, bool]:
    """(argparse type, several values?) of an annotation: X, X | None, tuple[X, ...] (| None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_arguments(parser, config_cls: type, *, only: tuple[str, ...] | None = None,
                         extra_help: dict[str, str] | None = None) -> None:
    """One flag per documented field of ``config_cls`` (or of the fields named in ``only``); a field's
    ``group`` metadata puts it in that argument group, ``extra_help`` appends to a field's help."""
    hints = typing.get_type_hints(config_cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata or (only is not None and f.name not in only):
            continue
        meta, default, (kind, several) = f.metadata, _default(f), _kind(hints[f.name])
        dashed = f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"] + (extra_help or {}).get(f.name, "")}
        target = parser
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if kind is bool:
            flag = meta.get("flag", f"--no-{dashed}" if default else f"--{dashed}")
            kw["action"] = "store_false" if default else "store_true"
            # absent unless given (the field's default applies): `--no-csv (default: True)` would mislead
            kw["default"] = argparse.SUPPRESS
        else:
            flag = meta.get("flag", f"--{dashed}")
            kw["type"] = kind
            if several:
                kw["nargs"] = "+"
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = list(default) if isinstance(default, tuple) else default
            kw.update({k: meta[k] for k in _PASSED if k in meta})
        target.add_argument(flag, **kw)


def config_from_args(config_cls: type, args, **extra: Any):
    """``config_cls`` from the parsed flags (fields without a flag keep their default), plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if f.init and hasattr(args, f.name)}
    for f in dataclasses.fields(config_cls):
        if f.name in values and isinstance(_default(f), tuple):
            values[f.name] = tuple(values[f.name])
    return config_cls(**{**values, **extra})
