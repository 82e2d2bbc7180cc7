"""`open-clip-sigrel eval`: geometry metrics of a checkpoint on local data, or of saved embeddings.

Parses the flags (the fields of open_clip_sigrel.tools.evaluate.EvalConfig), checks them and that
--output (and --plots) can be written before any work, evaluates, writes the plots into a temporary
folder, the JSON atomically, and only then moves the plots into place (nothing is left behind when a
write fails), and prints the metrics. A bad input prints ``error: ...`` on stderr and exits 2 (argparse's
convention); a missing extra exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from open_clip_sigrel.cli._fields import add_config_arguments, config_from_args
from open_clip_sigrel.extras import require
from open_clip_sigrel.io import check_writable_dir, check_writable_file
from open_clip_sigrel.tools.eval_data import EvalError
from open_clip_sigrel.tools.evaluate import (
    DATA_FIELDS,
    RUN_FIELDS,
    SOURCE_FIELDS,
    EvalConfig,
    evaluate,
    format_table,
    save_result,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel eval`."""
    groups = (("what to evaluate (a model on --data, or --embeddings)", SOURCE_FIELDS),
              ("data options", DATA_FIELDS), ("running", RUN_FIELDS))
    for title, names in groups:
        add_config_arguments(parser.add_argument_group(title), EvalConfig, only=names)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="JSON file to write (atomically)")
    out.add_argument("--plots", default=None, help="folder for similarity_histograms.png and modality_projection.png")


PLOT_FILES = ("similarity_histograms.png", "modality_projection.png")


def _write_plots(result: dict, image, text, folder: Path) -> None:
    from open_clip_sigrel.tools.plots import plot_modality_projection, plot_similarity_histograms

    try:
        plot_similarity_histograms(image, text, folder / PLOT_FILES[0], metrics=result["metrics"])
        plot_modality_projection(image, text, folder / PLOT_FILES[1])
    except OSError as e:
        raise EvalError(f"cannot write plots to {folder}: {e}") from e


def _check_outputs(args: argparse.Namespace) -> None:
    """EvalError, before any work, for an --output / --plots that cannot be written."""
    try:
        check_writable_file(args.output, what="--output")
        if args.plots:
            check_writable_dir(args.plots, what="--plots")
    except ValueError as e:
        raise EvalError(str(e)) from e
    if args.plots:
        require("matplotlib", "plots")


def run(args: argparse.Namespace) -> int:
    """0 on success, 2 on a reported bad input, 1 on a missing extra (nothing written then)."""
    staging = None
    try:
        config = config_from_args(EvalConfig, args)
        config.check()
        _check_outputs(args)
        result, image, text = evaluate(config, progress=True)
        split = result.get("split")
        if split is not None and split != config.split:
            print(f"note: split '{config.split}' not in {config.data}; using the only split '{split}'",
                  file=sys.stderr)
        if args.plots:
            plots = Path(args.plots)
            plots.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{plots.name}.", suffix=".tmp", dir=plots.parent))
            _write_plots(result, image, text, staging)
        try:
            save_result(result, args.output)
        except OSError as e:
            raise EvalError(f"cannot write {args.output}: {e}") from e
        if staging is not None:  # the JSON is there: now the plots
            plots.mkdir(exist_ok=True)
            for name in PLOT_FILES:
                os.replace(staging / name, plots / name)
    except (EvalError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    print(format_table(result))
    return 0
