"""What ``open-clip-sigrel eval`` reads: saved embeddings, torch files and image-text data, checked first.

Data (``EvalConfig.data``): webdataset shards (brace expansion, several specs joined by ``::``;
members ``png;jpg;jpeg;webp`` + ``txt``), an open_clip CSV/TSV file read by open_clip_train's own
``CsvDataset`` (``csv_img_key``, ``csv_caption_key``, ``csv_separator``; image paths relative to the
working directory, as open_clip reads them), or a clip_benchmark local webdataset folder
``root/{split}/{0..n-1}.tar`` with ``root/{split}/nshards.txt`` (and ``root/dataset_type.txt`` =
``retrieval``; what ``make-data`` writes). A shard sample's ``.txt`` holds one caption per line, as
clip_benchmark reads it (``str.splitlines``): several lines are several captions of the image, each a
text (the geometry metrics' multi-caption convention); a sample with no caption or a blank caption line
is an error naming it. A CSV row is one caption (its first non-empty line), as open_clip trains on it.

Embeddings (``embeddings``): ``.npz`` (loaded with allow_pickle=False) or ``.pt`` (weights_only=True)
holding ``image`` and ``text`` (N, d) arrays and optionally the scalars ``logit_scale`` (t, already
exponentiated) and ``logit_bias``; several captions per image: ``text`` (M, d) with ``text_image`` (M,),
the image index of each caption.

Every file is checked before the work starts (the checkpoint's and embeddings' pickled objects, each
local shard's tar structure, the CSV's columns and image files); a failure raises :class:`EvalError`
(a ValueError) naming the file or setting. :func:`build_loader` turns what :func:`resolve_data` found
into the DataLoader that ``open_clip_sigrel.tools.evaluate.encode`` reads.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from open_clip_sigrel.extras import require

if TYPE_CHECKING:  # the settings' type only: evaluate.py imports this module
    from open_clip_sigrel.tools.evaluate import EvalConfig

__all__ = ["EvalError", "load_embeddings", "resolve_data", "check_shards", "build_loader", "dataset_name"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
EMBEDDING_KEYS = ("image", "text", "logit_scale", "logit_bias", "text_image")


class EvalError(ValueError):
    """A user-facing failure whose message names the input at fault."""


def _first_msg(e: BaseException) -> str:
    """The first non-empty line of an exception's message, plus the next one (state_dict errors)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


# ---------------------------------------------------------------------------------- torch files
#: how a legacy (pre-zip) torch.save file starts: its magic number, pickled with protocol 2
_LEGACY_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def _refuse_unpickling(path: Path, what: str = "") -> EvalError:
    return EvalError(f"refusing to load {path}: it holds objects that would need unpickling{what}; "
                     "only tensors, arrays and plain containers are read (torch.load(weights_only=True))")


def _check_weights_only(path: Path) -> None:
    """EvalError, before loading, for a file that is no torch file or holds objects weights_only refuses.

    The pickle's globals are read without running it (torch.serialization.get_unsafe_globals_in_checkpoint,
    torch >= 2.5). Legacy (non-zip) torch files are recognised by their leading magic number and left to
    torch.load(weights_only=True), which refuses objects in them with an UnpicklingError.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_HEAD))
        if head != _LEGACY_HEAD:
            raise EvalError(f"cannot read {path} as a torch file: neither a torch.save archive (zip) nor "
                            "a legacy torch.save file")
        return
    probe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if probe is None:
        return
    try:
        unsafe = probe(str(path))
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # a zip, but no torch.save archive
        raise EvalError(f"cannot read {path} as a torch file: {type(e).__name__}: {_first_msg(e)}") from e
    if unsafe:
        raise _refuse_unpickling(path, f" ({', '.join(sorted(unsafe))})")


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True) on the CPU, with the failures told apart by type."""
    _check_weights_only(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a legacy torch file with objects
        raise _refuse_unpickling(path) from e
    except Exception as e:  # anything else torch.load raises on a file that is no torch file
        raise EvalError(f"cannot read {path} as a torch file: {type(e).__name__}: {_first_msg(e)}") from e


# ------------------------------------------------------------------------------------ embeddings
def load_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """{'image', 'text'[, 'logit_scale', 'logit_bias']} from an .npz / .pt file, never unpickling."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"embeddings file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.files)
                data = {k: _npz_get(z, k, p) for k in EMBEDDING_KEYS if k in keys}
        except EvalError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise EvalError(f"cannot read {p} as .npz: {e}") from e
    elif suffix in (".pt", ".pth"):
        obj = _torch_load(p)
        if not isinstance(obj, dict):
            raise EvalError(f"{p} must hold a dict with tensors 'image' and 'text', got {type(obj).__name__}")
        keys = [str(k) for k in obj]
        data = {k: obj[k] for k in EMBEDDING_KEYS if k in obj}
    else:
        raise EvalError(f"embeddings must be .npz or .pt, got {p.name}")
    missing = [k for k in ("image", "text") if k not in data]
    if missing:
        raise EvalError(f"{p} lacks {' and '.join(repr(k) for k in missing)}; it has keys: {', '.join(keys) or '(none)'}")
    for k in ("logit_scale", "logit_bias"):
        if k in data:
            v = data[k]
            n = v.numel() if isinstance(v, torch.Tensor) else np.size(v)
            if n != 1:
                raise EvalError(f"{p}: '{k}' must be a scalar, got {n} values")
    return data


def _npz_get(z, key: str, path: Path):
    try:
        return z[key]
    except ValueError as e:  # numpy refuses object arrays under allow_pickle=False
        raise EvalError(f"refusing to load {path}: array '{key}' holds pickled objects ({e})") from e


# ------------------------------------------------------------------------------------------ data
def _expand_shards(spec: str) -> list[str]:
    braceexpand = require("braceexpand", "data")
    urls: list[str] = []
    for part in spec.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def resolve_data(config: EvalConfig) -> tuple[str, Any, str | None]:
    """('csv', path, None) or ('wds', [shards], the split used or None) of ``config.data``, checked.

    Checks before any work: a CSV's columns and image files, each local shard's tar structure. A
    clip_benchmark folder without ``config.split`` but with one split uses that one (the third item
    says which); with several, EvalError lists them.
    """
    spec, split = config.data, config.split
    p = Path(spec)
    if p.suffix.lower() in (".csv", ".tsv"):
        if not p.is_file():
            raise EvalError(f"CSV file not found: {p}")
        if _check_csv(p, config.csv_img_key, config.csv_caption_key, config.csv_separator) == 0:
            raise EvalError(f"empty dataset: {p} has no rows")
        return "csv", p, None
    chosen = None
    if p.is_dir():
        splits = sorted(d.name for d in p.iterdir() if (d / "nshards.txt").is_file())
        if not splits:
            raise EvalError(f"{p} is a folder but no '{{split}}/nshards.txt' inside (clip_benchmark layout expected)")
        if split in splits:
            chosen = split
        elif len(splits) == 1:
            chosen = splits[0]
        else:
            raise EvalError(f"split '{split}' not found in {p}; available: {', '.join(splits)}")
        try:
            n = int((p / chosen / "nshards.txt").read_text().strip())
        except ValueError as e:
            raise EvalError(f"{p / chosen / 'nshards.txt'} must hold an integer") from e
        shards = [str(p / chosen / f"{i}.tar") for i in range(n)]
    else:
        shards = _expand_shards(spec)
    if not shards:
        raise EvalError(f"no shards in {spec}")
    check_shards(shards)
    return "wds", shards, chosen


def check_shards(shards: list[str]) -> None:
    """EvalError naming the first local shard that is missing, no tar archive, or cut short.

    Reads the tar headers only (tarfile seeks over the members' data and notices a file that ends
    inside one), so a bad shard is named before any encoding; remote URLs are left to webdataset.
    """
    for s in shards:
        if _is_url(s):
            continue
        p = Path(s)
        if not p.is_file():
            raise EvalError(f"missing shard: {s}")
        # a .tar is read as a plain tar: "r" would try every compression and report each failure
        mode = "r:" if p.suffix.lower() == ".tar" else "r"
        try:
            with tarfile.open(p, mode) as tar:
                tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EvalError(f"corrupt or unreadable shard {s}: {type(e).__name__}: {_first_msg(e)}") from e


def dataset_name(kind: str, source: Any, spec: str) -> str:
    """The dataset's name in the result, clip_benchmark's way: ``wds/<name>`` for shards (the
    clip_benchmark folder's name, or the folder holding the shards), ``csv/<stem>`` for a CSV."""
    if kind == "csv":
        return f"csv/{Path(source).stem}"
    p = Path(spec)
    if p.is_dir():
        return f"wds/{p.absolute().name}"
    folder = Path(str(source[0])).absolute().parent if source else p.parent
    if (folder / "nshards.txt").is_file() and (folder.parent / "dataset_type.txt").is_file():
        folder = folder.parent  # root/split/0.tar of a clip_benchmark folder
    return f"wds/{folder.name}"


def _captions(text: str) -> list[str] | str:
    """The captions of a .txt member (clip_benchmark's ``str.splitlines``), or what is wrong with them."""
    lines = text.splitlines()
    if not lines:
        return "has no caption (empty .txt)"
    blank = [i for i, line in enumerate(lines) if not line.strip()]
    if blank:
        return f"has a blank caption (line {blank[0] + 1} of its .txt)"
    return lines


def _wds_sample(sample: dict, preprocess, tokenizer) -> tuple[Any, Any, str | None]:
    """(image tensor, tokens of its captions, None), or (None, None, message) for a bad sample: the
    message crosses DataLoader workers as data (an exception would come back wrapped in a worker traceback)."""
    key, url = sample.get("__key__"), sample.get("__url__")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, None, (f"sample '{key}' in {url} has no image ({', '.join(IMAGE_EXTS)}); members: "
                            f"{', '.join(k for k in sample if not k.startswith('__'))}")
    if "txt" not in sample:
        return None, None, f"sample '{key}' in {url} has no txt caption"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            image = im.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError, truncated files
        return None, None, f"corrupt sample '{key}' in {url}: its .{ext} is not a readable image ({type(e).__name__})"
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return None, None, f"corrupt sample '{key}' in {url}: its .txt is not UTF-8 ({e.reason} at byte {e.start})"
    captions = _captions(caption)
    if isinstance(captions, str):
        return None, None, f"sample '{key}' in {url} {captions}"
    return preprocess(image), tokenizer(captions), None


def _stack(images):
    """Images as one batch: tensors stacked (a processor's dict of tensors stacked per key)."""
    if isinstance(images[0], dict):
        return {k: torch.stack([im[k] for im in images]) for k in images[0]}
    return torch.stack(images)


def _wds_collate(batch):
    """(images, tokens of every caption, captions per image, errors)."""
    errors = [err for *_, err in batch if err]
    if errors:
        return None, None, None, errors
    images, tokens, _ = zip(*batch)
    return _stack(images), torch.cat(tokens), [len(t) for t in tokens], []


def _csv_collate(batch):
    # open_clip_train's CsvDataset yields (image, tokens) in 2.x-3.x and {"image", "text"} in 4.x
    pairs = [(s["image"], s["text"]) if isinstance(s, dict) else s for s in batch]
    images, tokens = zip(*pairs)
    return _stack(images), torch.stack(tokens), [1] * len(tokens), []


class _FirstLineTokenizer:
    """A tokenizer that tokenizes each caption's first non-empty line (one text per image)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, *args, **kwargs):
        texts = _first_line(texts) if isinstance(texts, str) else [_first_line(str(t)) for t in texts]
        return self.tokenizer(texts, *args, **kwargs)


def _check_csv(path: Path, img_key: str, cap_key: str, sep: str) -> int:
    """Rows of an open_clip CSV; EvalError for an unreadable file, a missing column or image file."""
    pd = require("pandas", "data")
    try:
        df = pd.read_csv(path, sep=sep)
    except (ValueError, OSError) as e:  # pandas' ParserError / EmptyDataError are ValueErrors
        raise EvalError(f"cannot read CSV {path}: {e}") from e
    for k, flag in ((img_key, "--csv-img-key"), (cap_key, "--csv-caption-key")):
        if k not in df.columns:
            raise EvalError(f"CSV {path} has no column '{k}' ({flag}); columns: {', '.join(map(str, df.columns))}")
    for row, image in enumerate(df[img_key].tolist()):
        if not Path(str(image)).is_file():
            raise EvalError(f"CSV {path}, row {row}: image file not found: {image} (read relative to the "
                            f"working directory {os.getcwd()}, as open_clip does)")
    return len(df)


def build_loader(kind: str, source: Any, preprocess, tokenizer, config: EvalConfig):
    """A DataLoader of (images, tokens, captions per image, errors) batches over what :func:`resolve_data` found.

    CSV: open_clip_train.data.CsvDataset. Shards: a plain, unshuffled webdataset pipeline (open_clip's
    get_wds_dataset resamples or drops samples and skips unreadable shards with a warning, which an
    evaluation of every pair cannot have).
    """
    if kind == "csv":
        for module in ("pandas", "webdataset", "braceexpand"):  # what open_clip_train.data imports
            require(module, "data")
        from open_clip_train.data import CsvDataset

        ds = CsvDataset(str(source), preprocess, config.csv_img_key, config.csv_caption_key,
                        sep=config.csv_separator, tokenizer=_FirstLineTokenizer(tokenizer))
        if config.max_samples is not None and config.max_samples < len(ds):
            ds = torch.utils.data.Subset(ds, range(config.max_samples))
        return torch.utils.data.DataLoader(ds, batch_size=config.batch_size, num_workers=config.workers,
                                           shuffle=False, collate_fn=_csv_collate)
    wds = require("webdataset", "data")
    pipeline = (wds.WebDataset(source, shardshuffle=False)
                .map(functools.partial(_wds_sample, preprocess=preprocess, tokenizer=tokenizer))
                .batched(config.batch_size, collation_fn=_wds_collate, partial=True))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=config.workers)

