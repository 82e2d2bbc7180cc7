"""`open-clip-sigrel synth EXPERIMENT --output DIR [options] [--json]`: the paper's synthetic experiments.

Parsing, printing and exit codes only; the experiments, their defaults (``SynthConfig``, from which
every protocol / knob flag below is generated) and the files written are open_clip_sigrel.tools.synth's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any

from open_clip_sigrel.cli._fields import add_config_arguments, config_from_args
from open_clip_sigrel.io import format_table
from open_clip_sigrel.tools.synth import EXPERIMENTS, SynthConfig, run_experiment


def _per_experiment_help() -> dict[str, str]:
    """For fields whose default is None (filled per experiment): which experiment fills in what."""
    out = {}
    for f in fields(SynthConfig):
        per = [f"{name}: {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in exp.defaults[f.name])}"
               for name, exp in EXPERIMENTS.items() if f.name in exp.defaults]
        if f.default is None and per:
            out[f.name] = f"; None: the experiment's own ({'; '.join(per)})"
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel synth`."""
    parser.add_argument("experiment", choices=list(EXPERIMENTS),
                        help="which experiment: " + "; ".join(f"{n}: {e.description}" for n, e in EXPERIMENTS.items()))
    parser.add_argument("--output", required=True, help="directory for summary.json, curves.json and the PNGs")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG files")
    add_config_arguments(parser, SynthConfig, extra_help=_per_experiment_help())


def summary_table(summary: dict[str, Any]) -> str:
    """Console table of the final values of every run."""
    head = ("run", "seed", "loss", "t", "b_rel", "m*", "b*_rel", "xi")
    rows = []
    for run in summary["runs"]:
        f = run["final"]
        rows.append((run["name"], str(run["seed"]), f"{f['loss']:.3e}", f"{f['t']:.4g}", f"{f['b_rel']:+.4f}",
                     f"{f['margin']:+.4f}", f"{f['b_star']:+.4f}", f"{f['xi']:.2e}"))
    title = f"{summary['experiment']}: {len(rows)} runs, {summary['wall_time_s']:.1f} s"
    return format_table(head, rows, title=title)


def run(args: argparse.Namespace) -> int:
    """Entry of `open-clip-sigrel synth`: 0 on success, 2 on a bad option value, 1 without matplotlib."""
    try:
        summary = run_experiment(args.experiment, output=args.output, plots=not args.no_plots,
                                 config=config_from_args(SynthConfig, args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # the plots extra (checked before training)
        print(f"error: {exc} (or pass --no-plots)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        print(summary_table(summary))
        written = "curves.json, curves.png, histograms.png" if not args.no_plots else "curves.json"
        print(f"wrote {os.path.join(args.output, 'summary.json')}, {written}")
    return 0
