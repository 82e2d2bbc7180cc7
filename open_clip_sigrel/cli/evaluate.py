"""`open-clip-sigrel eval`: geometry metrics of a checkpoint on local data, or of saved embeddings.

Parses the flags (the fields of open_clip_sigrel.tools.evaluate.EvalConfig), evaluates, writes the
plots and then the JSON (atomically: nothing is written unless everything succeeded) and prints the
metrics. Failures print ``error: ...`` on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from open_clip_sigrel.cli._fields import add_config_arguments, config_from_args
from open_clip_sigrel.extras import require
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


def _write_plots(result: dict, image, text, folder: Path) -> None:
    require("matplotlib", "plots")
    from open_clip_sigrel.tools.plots import plot_modality_projection, plot_similarity_histograms

    try:
        plot_similarity_histograms(image, text, folder / "similarity_histograms.png", metrics=result["metrics"])
        plot_modality_projection(image, text, folder / "modality_projection.png")
    except OSError as e:
        raise EvalError(f"cannot write plots to {folder}: {e}") from e


def run(args: argparse.Namespace) -> int:
    """0 on success, 1 on a reported error (nothing written then)."""
    config = config_from_args(EvalConfig, args)
    try:
        if Path(args.output).is_dir():  # before the work, not after it
            raise EvalError(f"--output {args.output} is a directory; give a file name")
        result, image, text = evaluate(config, progress=True)
        split = result.get("split")
        if split is not None and split != config.split:
            print(f"note: split '{config.split}' not in {config.data}; using the only split '{split}'",
                  file=sys.stderr)
        if args.plots:
            _write_plots(result, image, text, Path(args.plots))
        try:
            save_result(result, args.output)
        except OSError as e:
            raise EvalError(f"cannot write {args.output}: {e}") from e
    except (EvalError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0
