"""Geometry metrics of an open_clip checkpoint on local data, or of saved embeddings.

The library side of ``open-clip-sigrel eval`` (its command line is open_clip_sigrel.cli.evaluate)::

    open-clip-sigrel eval --model sigrel-tiny --pretrained ckpt.pt --data 'val/{0..3}.tar' --output out.json
    open-clip-sigrel eval --embeddings emb.npz --output out.json --plots figs/

Settings: :class:`EvalConfig` (its fields are the flags). Data (``data``): webdataset shards (brace
expansion, several specs joined by ``::``; members ``png;jpg;jpeg;webp`` + ``txt``), an open_clip
CSV/TSV file read by open_clip_train's own ``CsvDataset`` (``csv_img_key``, ``csv_caption_key``,
``csv_separator``; image paths relative to the working directory, as open_clip reads them), or a
clip_benchmark-style folder ``root/{split}/{0..n-1}.tar`` with ``nshards.txt``. A multi-line caption
counts by its first non-empty line (one text per image). Precision as open_clip's ``--precision``
(open_clip's own autocast and input dtype).

Embeddings (``embeddings``): ``.npz`` (loaded with allow_pickle=False) or ``.pt`` (weights_only=True)
holding ``image`` and ``text`` (N, d) arrays and optionally the scalars ``logit_scale`` (t, already
exponentiated) and ``logit_bias``.

Every input is checked before the work starts (model name and tag, the checkpoint's and embeddings'
pickled objects, each local shard's tar structure, the CSV's columns and image files); a failure
raises :class:`EvalError` (a ValueError) naming the file or setting. :func:`evaluate` returns
clip_benchmark's JSON shape ``{"model", "pretrained", "dataset", "task": "geometry", "metrics"}``
(metrics as in ``open_clip_sigrel.metrics.geometry``); :func:`save_result` writes it atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import io
import json
import math
import os
import pickle
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open_clip_sigrel._io import format_table as _format_table
from open_clip_sigrel._optional import require

__all__ = ["EvalConfig", "EvalError", "evaluate", "load_embeddings", "resolve_data", "check_shards",
           "create_model", "build_loader", "encode", "save_result", "format_table"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
EMBEDDING_KEYS = ("image", "text", "logit_scale", "logit_bias")


class EvalError(ValueError):
    """A user-facing failure whose message names the input at fault."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how: the defaults of :func:`evaluate` and of ``open-clip-sigrel eval``'s flags."""

    model: str | None = field(default=None, metadata={
        "help": "open_clip model name (built-in, registered, 'hf-hub:org/repo' or 'local-dir:path')"})
    pretrained: str | None = field(default=None, metadata={"help": "pretrained tag of --model or a checkpoint file"})
    model_config: str | None = field(default=None, metadata={
        "help": "model config JSON (bare or open_clip hub format) to register before creating the model"})
    data: str | None = field(default=None, metadata={
        "help": "webdataset shards ('dir/{0..3}.tar'), a .csv/.tsv file, or a clip_benchmark folder"})
    embeddings: str | None = field(default=None, metadata={
        "help": ".npz or .pt with arrays 'image' and 'text' (+ optional 'logit_scale' t, 'logit_bias')"})
    split: str = field(default="test", metadata={
        "help": "split of a clip_benchmark folder (falls back to the only one)"})
    csv_img_key: str = field(default="filepath", metadata={"help": "CSV column with image paths (as open_clip)"})
    csv_caption_key: str = field(default="title", metadata={"help": "CSV column with captions (as open_clip)"})
    csv_separator: str = field(default="\t", metadata={"help": "CSV field separator (as open_clip)"})
    max_samples: int | None = field(default=None, metadata={"help": "evaluate at most this many pairs"})
    batch_size: int = field(default=64, metadata={"help": "encoding batch size"})
    workers: int = field(default=0, metadata={"help": "data loader workers"})
    device: str = field(default_factory=_default_device, metadata={"help": "device for encoding and for the metrics"})
    precision: str = field(default="fp32", metadata={"help": "as open_clip's --precision", "choices": PRECISIONS})
    chunk_size: int | None = field(default=None, metadata={
        "help": "rows per tile of the pairwise metrics (default 1024; ~4M similarities per tile)"})

    def check(self) -> None:
        """EvalError for settings that cannot work together."""
        if (self.data is None) == (self.embeddings is None):
            raise EvalError("give exactly one of --data (with --model) or --embeddings")
        if self.data is not None and not self.model:
            raise EvalError("--data needs --model")
        for name in ("batch_size", "chunk_size", "max_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.workers < 0:
            raise EvalError(f"--workers must be >= 0, got {self.workers}")
        if self.precision not in PRECISIONS:
            raise EvalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


#: EvalConfig's fields by what they are about (the command line's argument groups).
SOURCE_FIELDS = ("model", "pretrained", "model_config", "data", "embeddings")
DATA_FIELDS = ("split", "csv_img_key", "csv_caption_key", "csv_separator", "max_samples")
RUN_FIELDS = ("batch_size", "workers", "device", "precision", "chunk_size")


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


def _wds_sample(sample: dict, preprocess, tokenizer) -> tuple[Any, Any, str | None]:
    """(image tensor, tokens, None), or (None, None, message) for a bad sample: the message crosses
    DataLoader workers as data (an exception would come back wrapped in a worker traceback)."""
    key, url = sample.get("__key__"), sample.get("__url__")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, None, (f"sample '{key}' in {url} has no image ({', '.join(IMAGE_EXTS)}); members: "
                            f"{', '.join(k for k in sample if not k.startswith('__'))}")
    if "txt" not in sample:
        return None, None, f"sample '{key}' in {url} has no txt caption"
    require("PIL", "data")
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
    return preprocess(image), tokenizer([_first_line(caption)])[0], None


def _wds_collate(batch):
    errors = [err for *_, err in batch if err]
    if errors:
        return None, None, errors
    images, tokens, _ = zip(*batch)
    return torch.stack(images), torch.stack(tokens), []


def _csv_collate(batch):
    # open_clip_train's CsvDataset yields (image, tokens) in 2.x-3.x and {"image", "text"} in 4.x
    pairs = [(s["image"], s["text"]) if isinstance(s, dict) else s for s in batch]
    images, tokens = zip(*pairs)
    return torch.stack(images), torch.stack(tokens), []


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
    """A DataLoader of (images, tokens, errors) batches over what :func:`resolve_data` found.

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


# ----------------------------------------------------------------------------------------- model
def _register_configs(config: EvalConfig) -> None:
    from open_clip_sigrel.configs import add_model_config, register_shipped_configs

    register_shipped_configs()
    if config.model_config:
        try:
            add_model_config(config.model_config)
        except (OSError, ValueError) as e:
            raise EvalError(f"--model-config {config.model_config}: {e}") from e


def _check_model_name(model: str, pretrained: str | None) -> None:
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        if model.startswith("local-dir:") and not Path(model[len("local-dir:"):]).is_dir():
            raise EvalError(f"local-dir model folder not found: {model[len('local-dir:'):]}")
        return
    name = model.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else " (see open_clip.list_models())"
        raise EvalError(f"unknown model '{model}'{hint}")
    if pretrained and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            what = f"known tags for {name}: {', '.join(tags)}" if tags else f"{name} has no known tags"
            raise EvalError(f"--pretrained '{pretrained}' is neither a file nor a known tag ({what})")


def create_model(config: EvalConfig, device: torch.device):
    """(model, val preprocess, tokenizer) via open_clip, with checkpoint errors made readable.

    A checkpoint *file* is loaded after building the architecture (``open_clip.load_checkpoint``, the
    same call open_clip makes), so a load failure is attributed to the checkpoint; tags, hf-hub: and
    local-dir: names go through ``create_model_and_transforms`` as they are.
    """
    import open_clip

    _register_configs(config)
    _check_model_name(config.model, config.pretrained)
    ckpt_file = (config.pretrained if config.pretrained and Path(config.pretrained).is_file()
                 and not config.model.startswith(("hf-hub:", "local-dir:")) else None)
    if ckpt_file and Path(ckpt_file).suffix.lower() not in (".safetensors", ".npz", ".npy"):
        # read once on its own so that unreadable / unsafe files are told apart from misfits
        _torch_load(Path(ckpt_file))
    try:
        with _quiet_random_init_warning(ckpt_file is not None):
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model, pretrained=None if ckpt_file else (config.pretrained or None), device=device,
                precision=config.precision)
    except Exception as e:
        raise EvalError(f"could not create model '{config.model}' (pretrained={config.pretrained}): "
                        f"{type(e).__name__}: {_first_msg(e)}") from e
    if ckpt_file:
        try:
            open_clip.load_checkpoint(model, ckpt_file, weights_only=True)
        except Exception as e:
            raise EvalError(f"checkpoint {ckpt_file} does not fit the architecture of model '{config.model}': "
                            f"{type(e).__name__}: {_first_msg(e)}") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(config.model)


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """Hides open_clip's 'Model initialized randomly' warning when the checkpoint is loaded next."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        if active:
            root.removeFilter(drop)


@torch.no_grad()
def encode(model, loader, config: EvalConfig, device: torch.device, *, progress: bool = False):
    """Normalised (image, text) features of every pair, float32, on ``device``.

    Autocast and input dtype are open_clip's own for ``config.precision``; ``progress`` shows a tqdm
    bar on stderr.
    """
    import open_clip
    from open_clip_train.precision import get_autocast
    from tqdm import tqdm

    feats_i, feats_t, n = [], [], 0
    in_dtype = open_clip.get_input_dtype(config.precision)
    autocast = get_autocast(config.precision, device_type=device.type)
    limit = config.max_samples
    bar = tqdm(total=limit, desc="encoding", unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for images, tokens, errors in loader:
            if errors:
                raise EvalError(errors[0])
            if limit is not None and n + len(tokens) > limit:
                images, tokens = images[: limit - n], tokens[: limit - n]
            images = images.to(device=device, dtype=in_dtype) if in_dtype else images.to(device)
            with autocast():
                fi = model.encode_image(images, normalize=True)
                ft = model.encode_text(tokens.to(device), normalize=True)
            feats_i.append(fi.float())
            feats_t.append(ft.float())
            n += len(tokens)
            bar.update(len(tokens))
            if limit is not None and n >= limit:
                break
    except EvalError:
        raise
    except Exception as e:  # what the checks up front cannot see (a remote shard, an undecodable CSV image)
        raise EvalError(f"reading {config.data} failed: {type(e).__name__}: {_first_msg(e)}") from e
    finally:
        bar.close()
    if n == 0:
        raise EvalError(f"empty dataset: no (image, text) samples in {config.data}")
    return torch.cat(feats_i), torch.cat(feats_t)


# ------------------------------------------------------------------------------------------- run
def evaluate(config: EvalConfig | None = None, *, progress: bool = False, **options: Any) -> tuple[dict, Any, Any]:
    """(result dict, image features, text features) of ``config`` (with fields as keyword overrides).

    Raises EvalError (a ValueError) for any input that cannot be evaluated, ImportError naming the
    extra when the data pipeline's packages (the ``data`` extra) are missing.
    """
    from open_clip_sigrel.metrics.geometry import geometry_metrics

    cfg = dataclasses.replace(config if config is not None else EvalConfig(), **options)
    cfg.check()
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise EvalError(f"bad --device {cfg.device}: {e}") from e
    result: dict[str, Any] = {"model": cfg.model, "pretrained": cfg.pretrained}
    if cfg.embeddings is not None:
        emb = load_embeddings(cfg.embeddings)
        image, text = emb["image"], emb["text"]
        if cfg.max_samples is not None:
            image, text = image[: cfg.max_samples], text[: cfg.max_samples]
        scale, bias = emb.get("logit_scale"), emb.get("logit_bias")
        result["dataset"] = str(cfg.embeddings)
    else:
        kind, source, split = resolve_data(cfg)
        model, preprocess, tokenizer = create_model(cfg, device)
        loader = build_loader(kind, source, preprocess, tokenizer, cfg)
        image, text = encode(model, loader, cfg, device, progress=progress)
        scale = float(model.logit_scale.detach().float().exp().mean())
        lb = getattr(model, "logit_bias", None)
        bias = None if lb is None else float(lb.detach().float().mean())
        result["dataset"] = str(cfg.data)
        if split is not None:
            result["split"] = split
    result["task"] = "geometry"
    try:
        metrics = geometry_metrics(image, text, logit_scale=scale, logit_bias=bias, chunk_size=cfg.chunk_size)
    except ValueError as e:
        raise EvalError(str(e)) from e
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise EvalError(f"non-finite metrics: {', '.join(bad)}")
    result["metrics"] = metrics
    return result, image, text


def save_result(result: dict, path: str | os.PathLike) -> None:
    """Writes the result as JSON atomically (temporary file + rename): the file is whole or absent."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"--output {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fmt(v: Any) -> str:
    if isinstance(v, int):
        return f"{v:d}"
    if isinstance(v, float) and (v == 0 or 1e-4 <= abs(v) < 1e5):
        return f"{v:.6f}"
    return f"{v:.6g}"


def format_table(result: dict) -> str:
    """The metrics as a 'metric  value' table under a one-line description of what was evaluated."""
    title = (f"model={result.get('model')} pretrained={result.get('pretrained')} "
             f"dataset={result.get('dataset')} task={result.get('task')}")
    return _format_table(("metric", "value"), [(k, _fmt(v)) for k, v in result["metrics"].items()], title=title)
