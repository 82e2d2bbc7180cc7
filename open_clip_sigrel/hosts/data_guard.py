"""Bad training data stops the run, naming the shard, instead of hanging or flooding the log.

open_clip's webdataset pipeline hands every read or decode error to ``log_and_continue``, which logs
and goes on: a missing or empty shard list then loops forever ("Handling webdataset error ...
Ignoring"), and a corrupt shard trains silently on part of its data. Two guards:

  check_shards(args)   before work, on every rank: each local shard named by --train-data /
                       --val-data exists, is a complete tar (every header readable to the end) and
                       holds at least one image with a caption. Remote URLs (pipe:, s3://, http://)
                       are left to the loader. A CSV (open_clip's CsvDataset): the file, its two
                       columns and the first CSV_IMAGES_CHECKED image files.
  SampleGuard          replaces ``log_and_continue`` (and the handler bound into
                       ``tarfile_to_samples_nothrow``) for the run: a data-loader worker skips at most
                       --sigrel-max-bad-samples unreadable samples (default 0), each logged once, and
                       the next one raises, naming the shard and the error.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import tarfile

from open_clip_sigrel.hosts.options import SigrelOptionError

_logger = logging.getLogger("open_clip_sigrel")
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # open_clip's wds.rename(image="jpg;png;jpeg;webp", text="txt")


def _is_webdataset(args: argparse.Namespace, urls: str) -> bool:
    kind = getattr(args, "dataset_type", "auto")
    return kind == "webdataset" or (kind == "auto" and ".tar" in urls.split("::")[0])


def _is_csv(args: argparse.Namespace, urls: str) -> bool:
    kind = getattr(args, "dataset_type", "auto")
    return kind == "csv" or (kind == "auto" and urls.split("::")[0].endswith((".csv", ".tsv")))


def _shards(urls: str) -> list[str]:
    import braceexpand

    return [s for part in urls.split("::") for s in braceexpand.braceexpand(part)]


def shard_problem(path: str) -> str | None:
    """Why a local shard cannot train (None when it can)."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    stems: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # headers only: the data blocks are skipped by seeking
            for member in tar:
                if member.isfile():
                    stem, _, ext = os.path.basename(member.name).partition(".")
                    stems.setdefault(os.path.join(os.path.dirname(member.name), stem), set()).add(ext.lower())
            end = tar.offset  # the end of the last member's data blocks
    except (tarfile.TarError, EOFError, OSError) as e:
        return f"is not a complete tar file ({e})"
    # tarfile stops quietly at a cut header or data block; a complete tar ends in two zero blocks
    if os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
        return f"is not a complete tar file (truncated: {os.path.getsize(path)} bytes, its members need {end} + the end blocks)"
    if not stems:
        return "holds no files"
    if not any("txt" in exts and exts.intersection(IMAGE_EXTS) for exts in stems.values()):
        return f"holds no sample with both an image ({'/'.join(IMAGE_EXTS)}) and a caption (txt)"
    return None


CSV_IMAGES_CHECKED = 64  # image paths of a CSV checked before work (all of them would cost a stat per sample)


def csv_problem(path: str, args: argparse.Namespace) -> str | None:
    """Why a local CSV (open_clip's CsvDataset) cannot train (None when it can): the file, its two columns
    (--csv-img-key, --csv-caption-key under --csv-separator), and its first image files."""
    import pandas as pd

    if not os.path.isfile(path):
        return "does not exist"
    sep = getattr(args, "csv_separator", "\t")
    keys = (getattr(args, "csv_img_key", "filepath"), getattr(args, "csv_caption_key", "title"))
    try:
        df = pd.read_csv(path, sep=sep, nrows=CSV_IMAGES_CHECKED)
    except Exception as e:  # pandas' parser errors have no common base
        return f"cannot be read as a CSV with separator {sep!r} ({e})"
    missing = [k for k in keys if k not in df.columns]
    if missing:
        return (f"has no column {', '.join(map(repr, missing))} (--csv-img-key / --csv-caption-key; its columns: "
                f"{', '.join(map(str, df.columns))})")
    if df.empty:
        return "has no rows"
    absent = [str(f) for f in df[keys[0]] if not os.path.exists(str(f))]
    if absent:
        return f"names image files that do not exist, e.g. {absent[0]} ({len(absent)} of its first {len(df)} rows)"
    return None


def check_shards(args: argparse.Namespace) -> None:
    """Every local webdataset shard (or CSV) of the run is readable and holds samples; else an error naming it."""
    for flag, urls in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if not urls:
            continue
        if _is_csv(args, urls) and "://" not in urls:
            why = csv_problem(urls, args)
            if why is not None:
                raise SigrelOptionError(f"{flag}: CSV {urls} {why}")
            continue
        if not _is_webdataset(args, urls):
            continue
        for shard in _shards(urls):
            if "://" in shard or shard.startswith("pipe:"):
                continue
            why = shard_problem(shard)
            if why is not None:
                raise SigrelOptionError(f"{flag}: shard {shard} {why}")


class SampleGuard:
    """A webdataset error handler that tolerates ``max_bad`` bad samples per worker, then raises."""

    def __init__(self, max_bad: int):
        self.max_bad, self.skipped = max_bad, 0

    def __call__(self, exn: BaseException) -> bool:
        self.skipped += 1
        where = _source(exn)
        if self.skipped > self.max_bad:
            raise RuntimeError(
                f"bad training sample{where}: {exn!r}. {self.skipped - 1} sample(s) skipped before it in this "
                f"data-loader worker (--sigrel-max-bad-samples {self.max_bad})") from exn
        _logger.warning(f"skipping bad sample {self.skipped} of at most {self.max_bad} in this worker{where}: {exn!r}")
        return True


def _source(exn: BaseException) -> str:
    url = getattr(exn, "args", ())[-1] if getattr(exn, "args", ()) else None
    return f" in {url}" if isinstance(url, str) and ("/" in url or url.endswith(".tar")) else ""


def swaps(args: argparse.Namespace) -> list[tuple]:
    """(module, name, value) for the run: open_clip_train.data's error handlers become the guard."""
    import open_clip_train.data as oc_data

    guard = SampleGuard(getattr(args, "sigrel_max_bad_samples", 0))
    out = [(oc_data, "log_and_continue", guard)]
    if hasattr(oc_data, "tarfile_to_samples_nothrow"):  # its handler is bound at definition
        original = oc_data.tarfile_to_samples_nothrow
        out.append((oc_data, "tarfile_to_samples_nothrow", functools.partial(original, handler=guard)))
    return out
