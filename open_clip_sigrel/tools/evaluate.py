"""`open-clip-sigrel eval`: geometry metrics of an open_clip checkpoint on local data, or of saved embeddings.

    open-clip-sigrel eval --model sigrel-tiny --pretrained ckpt.pt --data 'val/{0..3}.tar' --output out.json
    open-clip-sigrel eval --embeddings emb.npz --output out.json --plots figs/

Data (``--data``): webdataset shards (brace expansion, several specs joined by ``::``; members
``png;jpg;jpeg;webp`` + ``txt``), an open_clip CSV/TSV file (``--csv-img-key``, ``--csv-caption-key``,
``--csv-separator``), or a clip_benchmark-style folder ``root/{split}/{0..n-1}.tar`` with
``nshards.txt``. A multi-line caption counts by its first non-empty line (one text per image).

Embeddings (``--embeddings``): ``.npz`` (loaded with allow_pickle=False) or ``.pt`` (weights_only=True)
holding ``image`` and ``text`` (N, d) arrays and optionally the scalars ``logit_scale`` (t, already
exponentiated) and ``logit_bias``.

Output: clip_benchmark's JSON shape ``{"model", "pretrained", "dataset", "task": "geometry", "metrics"}``,
written atomically (temporary file + rename) only after everything succeeded; metrics as in
``open_clip_sigrel.metrics.geometry``. Failures print ``error: ...`` and exit non-zero with nothing written.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")


class EvalError(Exception):
    """A user-facing failure: printed as ``error: <message>``."""


# --------------------------------------------------------------------------------------- parser
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel eval`."""
    src = parser.add_argument_group("what to evaluate (a model on --data, or --embeddings)")
    src.add_argument("--model", help="open_clip model name (built-in, registered, 'hf-hub:org/repo' or 'local-dir:path')")
    src.add_argument("--pretrained", default=None, help="pretrained tag of --model or a checkpoint file")
    src.add_argument("--model-config", default=None,
                     help="model config JSON (bare or open_clip hub format) to register before creating the model")
    src.add_argument("--data", default=None,
                     help="webdataset shards ('dir/{0..3}.tar'), a .csv/.tsv file, or a clip_benchmark folder")
    src.add_argument("--embeddings", default=None,
                     help=".npz or .pt with arrays 'image' and 'text' (+ optional 'logit_scale' t, 'logit_bias')")
    data = parser.add_argument_group("data options")
    data.add_argument("--split", default="test", help="split of a clip_benchmark folder (falls back to the only one)")
    data.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths (as open_clip)")
    data.add_argument("--csv-caption-key", default="title", help="CSV column with captions (as open_clip)")
    data.add_argument("--csv-separator", default="\t", help="CSV field separator (as open_clip)")
    data.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many pairs")
    run_g = parser.add_argument_group("running")
    run_g.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    run_g.add_argument("--workers", type=int, default=0, help="data loader workers")
    run_g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device for encoding and for the metrics")
    run_g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as open_clip's --precision")
    run_g.add_argument("--chunk-size", type=int, default=None,
                       help="rows per tile of the pairwise metrics (default 1024; ~4M similarities per tile)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="JSON file to write (atomically)")
    out.add_argument("--plots", default=None, help="folder for similarity_histograms.png and modality_projection.png")


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
                data = {k: _npz_get(z, k, p) for k in ("image", "text", "logit_scale", "logit_bias") if k in keys}
        except EvalError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise EvalError(f"cannot read {p} as .npz: {e}") from e
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError
            raise _torch_load_error(p, e) from e
        if not isinstance(obj, dict):
            raise EvalError(f"{p} must hold a dict with tensors 'image' and 'text', got {type(obj).__name__}")
        keys = [str(k) for k in obj]
        data = {k: obj[k] for k in ("image", "text", "logit_scale", "logit_bias") if k in obj}
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


def _torch_load_error(path: Path, e: BaseException) -> EvalError:
    """Readable message for a failed torch.load(weights_only=True)."""
    text = str(e)
    if isinstance(e, __import__("pickle").UnpicklingError) or "weights_only" in text.lower():
        found = re.search(r"Unsupported global: ([^\n]*?) was not an allowed global", text)
        what = f" ({found.group(1)})" if found else ""
        return EvalError(f"refusing to load {path}: it holds objects that would need unpickling{what}; "
                         "only tensors, arrays and plain containers are read (torch.load(weights_only=True))")
    return EvalError(f"cannot read {path} as a torch file: {type(e).__name__}: {_first_msg(e)}")


def _npz_get(z, key: str, path: Path):
    try:
        return z[key]
    except ValueError as e:  # object arrays need pickle
        raise EvalError(f"refusing to load {path}: array '{key}' holds pickled objects ({e})") from e


# ------------------------------------------------------------------------------------------ data
def _expand_shards(spec: str) -> list[str]:
    import braceexpand

    urls: list[str] = []
    for part in spec.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def resolve_data(spec: str, split: str) -> tuple[str, Any, str | None]:
    """('csv', path, None) or ('wds', [shards], split-or-None); checks that local shards exist."""
    p = Path(spec)
    if p.suffix.lower() in (".csv", ".tsv"):
        if not p.is_file():
            raise EvalError(f"CSV file not found: {p}")
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
            print(f"note: split '{split}' not in {p}; using the only split '{chosen}'", file=sys.stderr)
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
    for s in shards:
        if not _is_url(s) and not Path(s).is_file():
            raise EvalError(f"missing shard: {s}")
    return "wds", shards, chosen


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def _wds_pair(sample: dict) -> tuple[Any, str]:
    key, url = sample.get("__key__"), sample.get("__url__")
    img = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if img is None:
        raise ValueError(f"sample '{key}' in {url} has no image ({', '.join(IMAGE_EXTS)}); members: "
                         f"{', '.join(k for k in sample if not k.startswith('__'))}")
    if "txt" not in sample:
        raise ValueError(f"sample '{key}' in {url} has no txt caption")
    txt = sample["txt"]
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8")
    return img, _first_line(txt)


class _CsvPairs(torch.utils.data.Dataset):
    def __init__(self, path: Path, img_key: str, cap_key: str, sep: str, transform):
        import pandas as pd

        try:
            df = pd.read_csv(path, sep=sep)
        except Exception as e:
            raise EvalError(f"cannot read CSV {path}: {e}") from e
        for k, flag in ((img_key, "--csv-img-key"), (cap_key, "--csv-caption-key")):
            if k not in df.columns:
                raise EvalError(f"CSV {path} has no column '{k}' ({flag}); columns: {', '.join(map(str, df.columns))}")
        self.root = path.parent
        self.images = [str(v) for v in df[img_key].tolist()]
        self.captions = [_first_line(str(v)) for v in df[cap_key].tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, i: int) -> Path:
        p = Path(self.images[i])
        if not p.is_absolute() and not p.exists() and (self.root / p).exists():
            p = self.root / p  # relative to the CSV's folder
        return p

    def __getitem__(self, i: int):
        from PIL import Image

        p = self._path(i)
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {p} (CSV row {i}): {e}") from e
        return self.transform(img), self.captions[i]


def _collate(batch):
    images, texts = zip(*batch)
    return torch.stack(images), list(texts)


def build_loader(kind: str, source: Any, preprocess, args: argparse.Namespace):
    """A DataLoader of (images, captions) batches."""
    if kind == "csv":
        ds = _CsvPairs(source, args.csv_img_key, args.csv_caption_key, args.csv_separator, preprocess)
        if len(ds) == 0:
            raise EvalError(f"empty dataset: {source} has no rows")
        if args.max_samples is not None and args.max_samples < len(ds):
            ds = torch.utils.data.Subset(ds, range(args.max_samples))
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                           shuffle=False, collate_fn=_collate)
    import webdataset as wds

    pipeline = (wds.WebDataset(source, shardshuffle=False)
                .decode("pilrgb")
                .map(_wds_pair)
                .map_tuple(preprocess, _identity)
                .batched(args.batch_size, collation_fn=_collate, partial=True))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=args.workers)


def _identity(x):
    return x


def _shard_in(error: BaseException, shards: list[str]) -> str | None:
    text = " ".join(str(a) for a in getattr(error, "args", ())) + " " + str(error)
    hits = [s for s in shards if s in text]
    return max(hits, key=len) if hits else None


# ----------------------------------------------------------------------------------------- model
def _register_configs(args: argparse.Namespace) -> None:
    try:
        from open_clip_sigrel.configs import add_model_config, register_shipped_configs
    except ImportError:  # pragma: no cover - the package ships it
        import open_clip

        add_model_config, register_shipped_configs = open_clip.add_model_config, (lambda: [])
    register_shipped_configs()
    if args.model_config:
        try:
            add_model_config(args.model_config)
        except (OSError, ValueError) as e:
            raise EvalError(f"--model-config {args.model_config}: {e}") from e


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


def create_model(args: argparse.Namespace, device: torch.device):
    """(model, val preprocess, tokenizer) via open_clip, with checkpoint errors made readable.

    A checkpoint *file* is loaded after building the architecture (``open_clip.load_checkpoint``, the
    same call open_clip makes), so a load failure is attributed to the checkpoint; tags, hf-hub: and
    local-dir: names go through ``create_model_and_transforms`` as they are.
    """
    import open_clip

    _register_configs(args)
    _check_model_name(args.model, args.pretrained)
    ckpt_file = (args.pretrained if args.pretrained and Path(args.pretrained).is_file()
                 and not args.model.startswith(("hf-hub:", "local-dir:")) else None)
    try:
        with _quiet_random_init_warning(ckpt_file is not None):
            model, _, preprocess = open_clip.create_model_and_transforms(
                args.model, pretrained=None if ckpt_file else (args.pretrained or None), device=device,
                precision=args.precision)
    except Exception as e:
        raise EvalError(f"could not create model '{args.model}' (pretrained={args.pretrained}): "
                        f"{type(e).__name__}: {_first_msg(e)}") from e
    if ckpt_file:
        try:  # read once on its own so that unreadable / unsafe files are told apart from misfits
            open_clip.factory.load_state_dict(ckpt_file, weights_only=True)
        except Exception as e:
            raise _torch_load_error(Path(ckpt_file), e) from e
        try:
            open_clip.load_checkpoint(model, ckpt_file, weights_only=True)
        except Exception as e:
            raise EvalError(f"checkpoint {ckpt_file} does not fit the architecture of model '{args.model}': "
                            f"{type(e).__name__}: {_first_msg(e)}") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(args.model)


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


def _first_msg(e: BaseException) -> str:
    """The first non-empty line of an exception's message, plus the next one (state_dict errors)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def _autocast(precision: str, device: torch.device):
    if precision == "amp":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _input_dtype(precision: str) -> torch.dtype | None:
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    return None


@torch.no_grad()
def encode(model, tokenizer, loader, args: argparse.Namespace, device: torch.device, shards: list[str] | None):
    """Normalised (image, text) features of every pair, float32, on ``device``."""
    from tqdm import tqdm

    feats_i, feats_t, n = [], [], 0
    in_dtype = _input_dtype(args.precision)
    limit = args.max_samples
    bar = tqdm(total=limit, desc="encoding", unit="pair", file=sys.stderr, dynamic_ncols=True)
    try:
        for images, texts in loader:
            if limit is not None and n + len(texts) > limit:
                images, texts = images[: limit - n], texts[: limit - n]
            images = images.to(device=device, dtype=in_dtype) if in_dtype else images.to(device)
            tokens = tokenizer(texts).to(device)
            with _autocast(args.precision, device):
                fi = model.encode_image(images, normalize=True)
                ft = model.encode_text(tokens, normalize=True)
            feats_i.append(fi.float())
            feats_t.append(ft.float())
            n += len(texts)
            bar.update(len(texts))
            if limit is not None and n >= limit:
                break
    except EvalError:
        raise
    except Exception as e:
        shard = _shard_in(e, shards or [])
        first = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)  # webdataset appends the url
        msg = [ln.strip() for ln in first.strip().splitlines() if ln.strip()]
        msg = msg[-1] if msg else type(e).__name__
        if shard:
            raise EvalError(f"corrupt or unreadable shard {shard}: {msg}") from e
        raise EvalError(f"reading {args.data} failed: {type(e).__name__}: {msg}") from e
    finally:
        bar.close()
    if n == 0:
        raise EvalError(f"empty dataset: no (image, text) samples in {args.data}")
    return torch.cat(feats_i), torch.cat(feats_t)


# ------------------------------------------------------------------------------------------- run
def _atomic_write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def format_table(result: dict) -> str:
    """The metrics as aligned 'name  value' lines under a one-line header."""
    m = result["metrics"]
    width = max(len(k) for k in m)
    head = (f"model={result.get('model')} pretrained={result.get('pretrained')} "
            f"dataset={result.get('dataset')} task={result.get('task')}")
    lines = [head, "-" * min(len(head), 100)]
    for k, v in m.items():
        if isinstance(v, int):
            s = f"{v:d}"
        elif isinstance(v, float) and (v == 0 or 1e-4 <= abs(v) < 1e5):
            s = f"{v:.6f}"
        else:
            s = f"{v:.6g}"
        lines.append(f"{k:<{width}}  {s:>14}")
    return "\n".join(lines)


def _validate_args(args: argparse.Namespace) -> None:
    if (args.data is None) == (args.embeddings is None):
        raise EvalError("give exactly one of --data (with --model) or --embeddings")
    if args.data is not None and not args.model:
        raise EvalError("--data needs --model")
    for name in ("batch_size", "chunk_size", "max_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.workers < 0:
        raise EvalError(f"--workers must be >= 0, got {args.workers}")
    if Path(args.output).is_dir():
        raise EvalError(f"--output {args.output} is a directory; give a file name")


def evaluate(args: argparse.Namespace) -> tuple[dict, Any, Any]:
    """Everything but writing: (result dict, image features, text features); raises EvalError."""
    from open_clip_sigrel.metrics.geometry import geometry_metrics

    _validate_args(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise EvalError(f"bad --device {args.device}: {e}") from e
    result: dict[str, Any] = {"model": args.model, "pretrained": args.pretrained}
    if args.embeddings is not None:
        emb = load_embeddings(args.embeddings)
        image, text = emb["image"], emb["text"]
        if args.max_samples is not None:
            image, text = image[: args.max_samples], text[: args.max_samples]
        scale, bias = emb.get("logit_scale"), emb.get("logit_bias")
        result["dataset"] = str(args.embeddings)
    else:
        kind, source, split = resolve_data(args.data, args.split)
        model, preprocess, tokenizer = create_model(args, device)
        loader = build_loader(kind, source, preprocess, args)
        image, text = encode(model, tokenizer, loader, args, device, source if kind == "wds" else None)
        scale = float(model.logit_scale.detach().float().exp().mean())
        lb = getattr(model, "logit_bias", None)
        bias = None if lb is None else float(lb.detach().float().mean())
        result["dataset"] = str(args.data)
        if split is not None:
            result["split"] = split
    result["task"] = "geometry"
    try:
        metrics = geometry_metrics(image, text, logit_scale=scale, logit_bias=bias, chunk_size=args.chunk_size)
    except ValueError as e:
        raise EvalError(str(e)) from e
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise EvalError(f"non-finite metrics: {', '.join(bad)}")
    result["metrics"] = metrics
    return result, image, text


def run(args: argparse.Namespace) -> int:
    """Entry of `open-clip-sigrel eval`; 0 on success, 1 on a reported error."""
    try:
        result, image, text = evaluate(args)
        if args.plots:
            from open_clip_sigrel.tools.plots import plot_modality_projection, plot_similarity_histograms

            folder = Path(args.plots)
            try:
                plot_similarity_histograms(image, text, folder / "similarity_histograms.png",
                                           metrics=result["metrics"])
                plot_modality_projection(image, text, folder / "modality_projection.png")
            except OSError as e:
                raise EvalError(f"cannot write plots to {folder}: {e}") from e
        try:
            _atomic_write_json(result, Path(args.output))
        except OSError as e:
            raise EvalError(f"cannot write {args.output}: {e}") from e
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0
