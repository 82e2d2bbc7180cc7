"""Training entry: open_clip_train.main with ``--loss {clip,siglip,sigrel}``, unforked.

    open-clip-sigrel-train --loss sigrel --train-data ... --model ViT-B-16-sigrel ...
    torchrun --nproc_per_node 8 -m open_clip_sigrel.cli.train -- --loss sigrel --logs ... ...

This module owns the command line (the plugin's flags, split off before open_clip's parser sees
them, and every check before work starts); how the run plugs into the installed open_clip_train
is the host adapter's business (open_clip_sigrel.hosts: 3.x name swaps or the 4.x task seam).
Without ``--loss`` the training is exactly open_clip's (the geometry metrics are added to its logs).
"""
from __future__ import annotations

import argparse
import sys

from open_clip_sigrel.configs import register_shipped_configs
from open_clip_sigrel.hosts.options import LOSSES, SigrelOptionError, add_sigrel_arguments, resolve_args


def build_plugin_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="open-clip-sigrel-train",
        add_help=False,
        allow_abbrev=False,  # never swallow a prefix of an open_clip flag
        description="open_clip training with the relative-bias sigmoid loss. "
        "All other flags are open_clip_train's own.",
    )
    g = p.add_argument_group("open_clip_sigrel")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="clip (softmax), siglip (same as --siglip) or sigrel (relative-bias sigmoid). "
                   "Default: open_clip's own choice (--siglip or clip).")
    add_sigrel_arguments(g)
    return p


def fail(message: str) -> None:
    """A bad command line: the message on stderr, then argparse's exit status 2."""
    print(f"open-clip-sigrel-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str], stock_parse_args=None) -> argparse.Namespace:
    """Plugin flags first, then open_clip_train.params.parse_args on the rest; validated together."""
    if stock_parse_args is None:
        from open_clip_train.params import parse_args as stock_parse_args
    plugin = build_plugin_parser()
    if any(a in ("-h", "--help") for a in argv):
        plugin.print_help()
        print("\nopen_clip_train flags:\n")
        stock_parse_args(["--help"])
    ours, rest = plugin.parse_known_args(argv)
    register_shipped_configs()  # sigrel-tiny, ViT-B-16-sigrel: usable with any --loss
    args = stock_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    try:
        resolve_args(args)
    except SigrelOptionError as e:
        fail(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs open_clip_train.main.main through the installed open_clip's adapter; returns its exit status."""
    from open_clip_sigrel import hosts

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m open_clip_sigrel.cli.train -- --logs ...` (torchrun's own --logs-specs)
        argv = argv[1:]
    try:
        adapter = hosts.select()
    except ImportError as e:
        fail(str(e))
    try:
        return adapter.run(argv, parse_args)
    except SigrelOptionError as e:  # an adapter's own checks (e.g. 4.x features sigrel cannot serve)
        fail(str(e))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
