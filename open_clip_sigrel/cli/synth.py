"""`open-clip-sigrel synth EXPERIMENT --output DIR [options] [--json]`: the paper's synthetic experiments;
`open-clip-sigrel synth report --output DIR [--seeds K]`: all of them, in three protocol combinations, audited.

Parsing, printing and exit codes only; the experiments, their defaults (``SynthConfig``, from which
every protocol / knob flag below is generated) and the files written are open_clip_sigrel.tools.synth's
(the report: open_clip_sigrel.tools.synth_report's). Each experiment is a subcommand with its own --help.
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


def _fields_for(knobs: tuple[str, ...] | None) -> tuple[str, ...]:
    """The protocol fields plus the experiment knobs an experiment reads (None: all)."""
    return tuple(f.name for f in fields(SynthConfig)
                 if f.metadata.get("group") != "experiment knobs" or knobs is None or f.name in knobs)


def _add_normalize_pair(parser: argparse.ArgumentParser) -> None:
    # _fields generates --no-in-loss-normalize (default True); the positive spelling, for symmetry
    parser.add_argument("--in-loss-normalize", dest="in_loss_normalize", action="store_true",
                        default=argparse.SUPPRESS, help="the default: re-normalise inside the loss (authors' code)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel synth`: one subcommand per experiment, plus `report`."""
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True,
                                help="; ".join(f"{n}: {e.description}" for n, e in EXPERIMENTS.items())
                                + "; report: every experiment, three protocols, verdicts per paper claim")
    extra = _per_experiment_help()
    for name, exp in EXPERIMENTS.items():
        p = sub.add_parser(name, help=exp.description, description=f"synth {name}: {exp.description}",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--output", required=True, help="directory for summary.json, curves.json and the PNGs")
        p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG files")
        add_config_arguments(p, SynthConfig, only=_fields_for(exp.knobs), extra_help=extra)
        _add_normalize_pair(p)
    from open_clip_sigrel.tools.synth_report import DEFAULT_SEEDS

    p = sub.add_parser("report", help="every experiment over K seeds in three protocol combinations, with verdicts",
                       description="synth report: every experiment over --seeds K seeds with (authors: clipped loss + "
                       "in-loss normalisation), (exact + normalisation), (exact, no normalisation); writes report.md, "
                       "report.json and report.png", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="directory for report.md, report.json, report.png")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per run (K)")
    p.add_argument("--json", action="store_true", help="print the whole report (every run, every seed) as JSON")
    p.add_argument("--no-plots", action="store_true", help="skip report.png")
    add_config_arguments(p, SynthConfig, only=("n", "dim", "steps", "lr", "seed", "record_every", "threads"))


def summary_table(summary: dict[str, Any]) -> str:
    """Console table of the final values of every run (m*: halved margin; gap: un-halved, = 2 m*)."""
    head = ("run", "seed", "loss", "t", "b_rel", "m* (halved)", "gap (2m*)", "b*_rel", "xi")
    rows = []
    for run in summary["runs"]:
        f = run["final"]
        rows.append((run["name"], str(run["seed"]), f"{f['loss']:.3e}", f"{f['t']:.4g}", f"{f['b_rel']:+.4f}",
                     f"{f['margin']:+.4f}", f"{f['gap']:+.4f}", f"{f['b_star']:+.4f}", f"{f['xi']:.2e}"))
    cfg = summary["config"]
    title = (f"{summary['experiment']}: {len(rows)} runs, {summary['wall_time_s']:.1f} s "
             f"(loss {cfg['loss_form']}, in-loss normalisation {'on' if cfg['in_loss_normalize'] else 'off'})")
    return format_table(head, rows, title=title)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _run_report(args: argparse.Namespace) -> int:
    from open_clip_sigrel.tools.synth_report import run_report

    try:
        doc = run_report(args.output, seeds=args.seeds, plots=not args.no_plots,
                         config=config_from_args(SynthConfig, args))
    except ValueError as exc:
        return _fail(str(exc))
    except ImportError as exc:
        print(f"error: {exc} (or pass --no-plots)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc))
    else:
        print("\n".join(doc["verdict_lines"]))
        print(f"wrote {os.path.join(args.output, 'report.md')}, report.json"
              + ("" if args.no_plots else ", report.png"))
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry of `open-clip-sigrel synth`: 0 on success, 2 on a bad option value, 1 without matplotlib."""
    if args.experiment == "report":
        return _run_report(args)
    try:
        summary = run_experiment(args.experiment, output=args.output, plots=not args.no_plots,
                                 config=config_from_args(SynthConfig, args))
    except ValueError as exc:
        return _fail(str(exc))
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
