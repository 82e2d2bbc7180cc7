"""`open-clip-sigrel SUBCOMMAND ...`: one entry, one module per subcommand.

Each module named in COMMANDS exposes ``configure_parser(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "make-data": ("open_clip_sigrel.cli.data", "write the shipped real-image dataset (digit mosaics) as shards and CSV"),
    "eval": ("open_clip_sigrel.cli.evaluate", "geometry metrics of a checkpoint or of precomputed embeddings"),
    "synth": ("open_clip_sigrel.cli.synth", "rerun the paper's synthetic constellation experiments"),
    "bounds": ("open_clip_sigrel.cli.bounds", "dimension / size bounds for (m, b_rel)-constellations"),
    "demo": ("open_clip_sigrel.cli.demo", "train the tiny model with --siglip and with --loss sigrel, side by side"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Configure only the chosen subcommand's parser (the others' imports are slow).
    args = build_parser(argv[:1]).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


def build_parser(first: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="open-clip-sigrel",
        description="Relative-bias sigmoid loss tools for open_clip. Training: open-clip-sigrel-train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.set_defaults(_module=module)
        if first and first[0] == name:
            importlib.import_module(module).configure_parser(p)
    return parser

