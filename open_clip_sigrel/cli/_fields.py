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


def _scalar(hint: Any) -> Any:
    """X for ``X | None`` / ``Optional[X]``, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_config_arguments(parser, config_cls: type, *, only: tuple[str, ...] | None = None) -> None:
    """One flag per documented field of ``config_cls`` (or of the fields named in ``only``)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata or (only is not None and f.name not in only):
            continue
        meta, default, kind = f.metadata, _default(f), _scalar(hints[f.name])
        dashed = f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if kind is bool:
            flag = meta.get("flag", f"--no-{dashed}" if default else f"--{dashed}")
            kw["action"] = "store_false" if default else "store_true"
            # absent unless given (the field's default applies): `--no-csv (default: True)` would mislead
            kw["default"] = argparse.SUPPRESS
        else:
            flag = meta.get("flag", f"--{dashed}")
            kw["type"] = kind
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = list(default) if isinstance(default, tuple) else default
            kw.update({k: meta[k] for k in _PASSED if k in meta})
        parser.add_argument(flag, **kw)


def config_from_args(config_cls: type, args, **extra: Any):
    """``config_cls`` from the parsed flags (fields without a flag keep their default), plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if f.init and hasattr(args, f.name)}
    for f in dataclasses.fields(config_cls):
        if f.name in values and isinstance(_default(f), tuple):
            values[f.name] = tuple(values[f.name])
    return config_cls(**{**values, **extra})
