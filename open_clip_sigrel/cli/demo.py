"""`open-clip-sigrel demo`: runs open_clip_sigrel.tools.demo and prints its table (or ``--json``)."""
from __future__ import annotations

import argparse
import json
import sys

from open_clip_sigrel.cli._fields import add_config_arguments, config_from_args
from open_clip_sigrel.tools.demo import DemoConfig, DemoRunError, format_table, run_demo


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``open-clip-sigrel demo``: the fields of DemoConfig and how to report."""
    add_config_arguments(parser, DemoConfig)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: report on the runs already in --output")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """0 on success, 1 if a run failed (or the data extra is missing), 2 on bad flags."""
    try:
        summary = run_demo(config_from_args(DemoConfig, args), train=not args.report_only,
                           plots=not args.no_plots, progress=None if args.quiet else _stderr)
    except ValueError as e:
        print(f"open-clip-sigrel demo: error: {e}", file=sys.stderr)
        return 2
    except (DemoRunError, ImportError) as e:
        print(f"open-clip-sigrel demo: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False, default=str))
    else:
        print(format_table(summary["runs"], n_val=summary["settings"]["n_val"]))
        print()
        print(summary["interpretation"])
        print()
        print(f"Runs, logs and checkpoints: {summary['runs_dir']}")
        for plot in summary["plots"]:
            print(f"Plot: {plot}")
    return 0
