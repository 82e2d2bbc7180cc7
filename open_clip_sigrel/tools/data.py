"""A small real-image image-text dataset built from scikit-learn's bundled handwritten digits.

Why this dataset: tests, the demo and the quick start need real images with captions that an
image-text model can actually learn, without downloading anything. ``sklearn.datasets.load_digits``
(1,797 8x8 grayscale scans) ships inside the sklearn wheel. One digit alone gives only 10 captions,
so each sample is a mosaic of K digits (default 2x2) captioned with the digits in reading order,
e.g. ``"digits 3 7 1 9"``. Every caption is unique across train and val, so each image has exactly
one positive text in any batch, which is what a contrastive (sigmoid) loss assumes.

Layout written by :func:`make_digits_dataset` (all under ``output_dir``)::

    train/0.tar, 1.tar, ...    webdataset shards, keys {idx:06d} with .png and .txt
    train/nshards.txt          number of shards   (clip_benchmark local webdataset layout)
    train/sizes.json           samples per shard  (lets open_clip infer --train-num-samples)
    val/...                    same for val
    dataset_type.txt           "retrieval": clip_benchmark evaluates the folder as a retrieval set,
                               ``clip_benchmark eval --dataset wds/<name> --dataset_root DIR --split val
                               --task zeroshot_retrieval`` (and ``open-clip-sigrel eval --data DIR --split val``)
    images/{split}/{idx:06d}.png, train.csv, val.csv   (when csv=True; tab-separated
                               columns filepath, title = open_clip's CSV defaults)
    info.json                  the dict returned by make_digits_dataset

``open-clip-sigrel make-data --output DIR`` is the command line (open_clip_sigrel.cli.data); the
settings and their defaults are the fields of :class:`DigitsConfig`. Needs the ``data`` extra
(scikit-learn for the digits, Pillow for the PNGs).
"""
from __future__ import annotations

import csv as csv_module
import dataclasses
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from open_clip_sigrel.extras import require
from open_clip_sigrel.io import check_writable_dir

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DigitsConfig", "make_digits_dataset", "ensure_digits_dataset"]

DIGIT_SIZE = 8  # sklearn digits are 8x8
MAX_IMAGE_SIZE = 1024  # pixels; PNGs are held in memory until written
MAX_SAMPLES = 10**6  # n_train + n_val: the images are rendered in memory
MAX_SEED = 2**63 - 1
DIGIT_MAX = 16  # sklearn digit intensities are integers 0..16
# 10**18 < 2**63: digit sequences are drawn as int64 codes.
MAX_DIGITS_PER_IMAGE = 18
SPLITS = ("train", "val")


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; reject it so that e.g. n_val=True is not silently 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class DigitsConfig:
    """What defines a digit-mosaic dataset; the defaults of the functions below and of ``make-data``.

    Checked on construction (ValueError naming the setting): counts are integers, captions stay
    unique (``n_train + n_val <= 10 ** digits_per_image``).
    """

    n_train: int = field(default=2048, metadata={"help": "number of training samples"})
    n_val: int = field(default=512, metadata={"help": "number of validation samples (0: no val split)"})
    digits_per_image: int = field(default=4, metadata={
        "help": "digits per mosaic (square grid, row-major); captions are unique, so "
                "n-train + n-val must be <= 10**digits-per-image"})
    image_size: int = field(default=32, metadata={"help": "side of the square RGB output images, pixels"})
    shard_size: int = field(default=512, metadata={"help": "samples per webdataset shard (.tar)"})
    seed: int = field(default=0, metadata={"help": "random seed; the dataset is deterministic for a seed"})
    csv: bool = field(default=True, metadata={
        "help": "write only webdataset shards, not the PNG files and tab-separated CSVs"})

    def __post_init__(self) -> None:
        for name, minimum in (("n_train", 1), ("n_val", 0), ("digits_per_image", 1), ("image_size", 1),
                              ("shard_size", 1), ("seed", 0)):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum))
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be <= {MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.n_train + self.n_val > MAX_SAMPLES:
            raise ValueError(f"n_train + n_val must be <= {MAX_SAMPLES}, got {self.n_train + self.n_val}")
        if self.shard_size > MAX_SAMPLES:
            raise ValueError(f"shard_size must be <= {MAX_SAMPLES}, got {self.shard_size}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be <= {MAX_SEED}, got {self.seed}")
        k = self.digits_per_image
        if k > MAX_DIGITS_PER_IMAGE:
            raise ValueError(f"digits_per_image must be <= {MAX_DIGITS_PER_IMAGE}, got {k}")
        if self.n_train + self.n_val > 10**k:
            raise ValueError(
                f"n_train + n_val = {self.n_train + self.n_val} exceeds the {10**k} distinct captions possible "
                f"with digits_per_image={k} (captions must be unique); lower the counts or raise digits_per_image"
            )
        object.__setattr__(self, "csv", bool(self.csv))

    def info_params(self) -> dict:
        """The content-defining settings under their info.json names (what a cached dataset must match)."""
        return {"train_num_samples": self.n_train, "val_num_samples": self.n_val,
                "digits_per_image": self.digits_per_image, "image_size": self.image_size,
                "shard_size": self.shard_size, "seed": self.seed}


def _config(config: DigitsConfig | None, options: dict) -> DigitsConfig:
    """``config`` (default: DigitsConfig()) with keyword overrides; TypeError on an unknown name."""
    return dataclasses.replace(config if config is not None else DigitsConfig(), **options)


def _grid_side(k: int) -> int:
    """Mosaics are square grids (row-major reading order) so resizing keeps the digits' aspect ratio."""
    return math.ceil(math.sqrt(k))


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] scaled to 0..255, labels int64 [N]) from the sklearn wheel; no download."""
    require("sklearn", "data")  # imported when used: an extra, and slow to import
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / DIGIT_MAX)).astype(np.uint8)
    return images, np.asarray(digits.target, dtype=np.int64)


def _draw_samples(n: int, k: int, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Distinct digit sequences [n, k] and, per position, a random source image of that class [n, k]."""
    codes = rng.choice(10**k, size=n, replace=False)  # distinct codes -> unique captions
    powers = 10 ** np.arange(k - 1, -1, -1, dtype=np.int64)
    seqs = (codes[:, None] // powers[None, :]) % 10
    order = np.argsort(labels, kind="stable")  # source indices grouped by class
    counts = np.bincount(labels, minlength=10)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.floor(rng.random((n, k)) * counts[seqs]).astype(np.int64)
    return seqs, order[starts[seqs] + offsets]


def _mosaic(cells: np.ndarray, image_size: int) -> Image.Image:
    """Tile K 8x8 uint8 digits row-major on a square grid (empty cells black), resize, make RGB."""
    from PIL import Image

    k = len(cells)
    side = _grid_side(k)
    canvas = np.zeros((side * DIGIT_SIZE, side * DIGIT_SIZE), dtype=np.uint8)
    for pos in range(k):
        r, c = divmod(pos, side)
        canvas[r * DIGIT_SIZE:(r + 1) * DIGIT_SIZE, c * DIGIT_SIZE:(c + 1) * DIGIT_SIZE] = cells[pos]
    img = Image.fromarray(canvas, mode="L")
    if image_size != canvas.shape[0]:
        # Nearest keeps the pixels exact when upscaling; bilinear avoids aliasing when shrinking.
        resample = Image.NEAREST if image_size > canvas.shape[0] else Image.BILINEAR
        img = img.resize((image_size, image_size), resample=resample)
    return img.convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) so shards are byte-identical for a given seed.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _shard_spec(split_dir: Path, n_shards: int) -> str:
    return str(split_dir / ("0.tar" if n_shards == 1 else f"{{0..{n_shards - 1}}}.tar"))


def _write_split(tmp_root: Path, final_root: Path, split: str, pngs: list[bytes], captions: list[str],
                 shard_size: int, write_csv: bool) -> tuple[str, str | None]:
    """Write one split's shards (+ images and CSV) under tmp_root; paths returned point into final_root."""
    split_dir = tmp_root / split
    split_dir.mkdir()
    n_shards = math.ceil(len(pngs) / shard_size)
    sizes = {}
    for s in range(n_shards):
        lo, hi = s * shard_size, min((s + 1) * shard_size, len(pngs))
        sizes[f"{s}.tar"] = hi - lo
        with tarfile.open(split_dir / f"{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for idx in range(lo, hi):
                _add_member(tar, f"{idx:06d}.png", pngs[idx])
                _add_member(tar, f"{idx:06d}.txt", captions[idx].encode("utf-8"))
    (split_dir / "nshards.txt").write_text(f"{n_shards}\n")
    (split_dir / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")

    csv_path = None
    if write_csv:
        img_dir = tmp_root / "images" / split
        img_dir.mkdir(parents=True)
        final_img_dir = final_root / "images" / split
        with open(tmp_root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv_module.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["filepath", "title"])
            for idx, (png, caption) in enumerate(zip(pngs, captions)):
                (img_dir / f"{idx:06d}.png").write_bytes(png)
                writer.writerow([str(final_img_dir / f"{idx:06d}.png"), caption])
        csv_path = str(final_root / f"{split}.csv")
    return _shard_spec(final_root / split, n_shards), csv_path


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _read_info(output_dir: Path) -> dict | None:
    try:
        info = json.loads((output_dir / "info.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _info_matches(info: dict | None, output_dir: Path, params: dict, csv: bool) -> bool:
    """Same parameters, same location (paths inside are absolute) and the shards are really there."""
    if info is None or any(info.get(key) != value for key, value in params.items()):
        return False
    if (info.get("train_csv") is not None) != csv:
        return False
    train_dir = output_dir / "train"
    return (str(info.get("train_data", "")).startswith(str(train_dir) + os.sep)
            and (train_dir / "0.tar").is_file() and (train_dir / "nshards.txt").is_file()
            and (output_dir / "dataset_type.txt").is_file())  # older builds lack it: rebuilt


def make_digits_dataset(output_dir: str | os.PathLike, config: DigitsConfig | None = None, *,
                        overwrite: bool = False, **options: Any) -> dict:
    """Write the digit-mosaic dataset (webdataset shards, optional CSV) and return its description.

    The settings are ``config`` (default ``DigitsConfig()``) with any of its fields given as keyword
    ``options`` on top (``make_digits_dataset(path, n_train=40, csv=False)``). Deterministic for a
    given seed. Everything is written into a temporary sibling directory and renamed into place at the
    end, so an interrupted run never leaves a dataset that looks complete. A non-empty ``output_dir``
    is refused (FileExistsError) unless ``overwrite=True``.

    Returns a dict with ``train_data`` / ``val_data`` (brace-expanded shard specs for
    ``--train-data`` / ``--val-data``; ``val_data`` is None when ``n_val == 0``), ``train_csv`` /
    ``val_csv`` (None without csv), ``train_num_samples``, ``val_num_samples``, ``digits_per_image``,
    ``image_size``, ``seed`` and ``shard_size``; the same dict is saved as ``output_dir/info.json``.
    """
    cfg = _config(config, options)
    output_dir = Path(output_dir).expanduser().absolute()
    for bad in ("{", "}", "::", "\t", "\n"):
        # Braces and '::' have meaning in webdataset shard specs; tabs/newlines would break the CSV.
        if bad in str(output_dir):
            raise ValueError(f"output_dir must not contain {bad!r}: {output_dir}")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output path exists and is not a directory: {output_dir}")
    if _is_nonempty_dir(output_dir) and not overwrite:
        raise FileExistsError(f"output directory is not empty: {output_dir} (pass overwrite=True / --overwrite)")
    # before rendering: the dataset is built in a sibling folder, then renamed into place
    check_writable_dir(output_dir.parent, what=f"--output {output_dir}: its folder")

    images, labels = _load_digits()
    rng = np.random.default_rng(cfg.seed)
    n_train, n = cfg.n_train, cfg.n_train + cfg.n_val
    seqs, sources = _draw_samples(n, cfg.digits_per_image, labels, rng)
    captions = ["digits " + " ".join(str(d) for d in row) for row in seqs.tolist()]
    pngs = [_png_bytes(_mosaic(images[src], cfg.image_size)) for src in sources]

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        train_data, train_csv = _write_split(
            tmp_root, output_dir, "train", pngs[:n_train], captions[:n_train], cfg.shard_size, cfg.csv)
        val_data = val_csv = None
        if cfg.n_val:
            val_data, val_csv = _write_split(
                tmp_root, output_dir, "val", pngs[n_train:], captions[n_train:], cfg.shard_size, cfg.csv)
        info = {"train_data": train_data, "val_data": val_data, "train_csv": train_csv, "val_csv": val_csv,
                **cfg.info_params()}
        (tmp_root / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp_root / "dataset_type.txt").write_text("retrieval\n")
        os.chmod(tmp_root, 0o755)  # mkdtemp makes it 0700
        _publish(tmp_root, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return info


def _publish(tmp_root: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished tmp dir onto output_dir (rename over an empty dir works on POSIX)."""
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()  # portable: Windows cannot rename onto an existing directory
    if not output_dir.exists():
        os.replace(tmp_root, output_dir)
        return
    if not overwrite:  # someone else filled it meanwhile
        raise FileExistsError(f"output directory is not empty: {output_dir} (pass overwrite=True / --overwrite)")
    # Move the old dataset aside first so that output_dir is never half old, half new.
    trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.replace(output_dir, trash / "old")
    os.replace(tmp_root, output_dir)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_digits_dataset(output_dir: str | os.PathLike, config: DigitsConfig | None = None, *,
                          overwrite: bool = False, **options: Any) -> dict:
    """Return ``output_dir/info.json`` if it describes a dataset built with the same settings, else build.

    Used as a cache by the demo, quick start and tests. A directory that already holds a digits
    dataset (it has a readable info.json) but with other settings is rebuilt in place; any other
    non-empty directory is refused unless ``overwrite=True``. Arguments are those of
    :func:`make_digits_dataset`.
    """
    cfg = _config(config, options)
    params = cfg.info_params()
    path = Path(output_dir).expanduser().absolute()
    info = _read_info(path)
    if _info_matches(info, path, params, cfg.csv):
        return info
    try:
        return make_digits_dataset(path, cfg, overwrite=overwrite or info is not None)
    except FileExistsError:
        # A concurrent caller may have built the same dataset between our check and our rename.
        info = _read_info(path)
        if _info_matches(info, path, params, cfg.csv):
            return info
        raise
