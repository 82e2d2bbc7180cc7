"""`open-clip-sigrel make-data`: writes the digit-mosaic dataset (open_clip_sigrel.tools.data), says how to use it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from open_clip_sigrel.cli._fields import add_config_arguments, config_from_args
from open_clip_sigrel.tools.data import DigitsConfig, make_digits_dataset


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``open-clip-sigrel make-data``: --output, --overwrite and the fields of DigitsConfig."""
    parser.add_argument("--output", required=True, help="directory to create (train/, val/, images/, *.csv, info.json)")
    add_config_arguments(parser, DigitsConfig)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")


def run(args: argparse.Namespace) -> int:
    """Builds the dataset and prints the open_clip flags that use it.

    Exit status 0; 2 on bad input or a non-empty --output; 1 without the data extra.
    """
    try:
        info = make_digits_dataset(args.output, config_from_args(DigitsConfig, args), overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # the 'data' extra is missing
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info['train_num_samples']} train + {info['val_num_samples']} val digit mosaics "
          f"({info['digits_per_image']} digits, {info['image_size']}x{info['image_size']} RGB) "
          f"to {Path(info['train_data']).parent.parent}")
    print(f"  --train-data '{info['train_data']}' --train-num-samples {info['train_num_samples']}")
    if info["val_data"]:
        print(f"  --val-data '{info['val_data']}' --val-num-samples {info['val_num_samples']}")
    if info["train_csv"]:
        print(f"  csv: --dataset-type csv --train-data {info['train_csv']}"
              + (f" --val-data {info['val_csv']}" if info["val_csv"] else ""))
    return 0
