"""Geometry metrics of an open_clip checkpoint on local data, or of saved embeddings.

The library side of ``open-clip-sigrel eval`` (its command line is open_clip_sigrel.cli.evaluate)::

    open-clip-sigrel eval --model sigrel-tiny --pretrained ckpt.pt --data 'val/{0..3}.tar' --output out.json
    open-clip-sigrel eval --embeddings emb.npz --output out.json --plots figs/

Settings: :class:`EvalConfig` (its fields are the flags); what ``data`` and ``embeddings`` may be
is in ``open_clip_sigrel.tools.eval_data``, which reads and checks them. Precision as open_clip's
``--precision`` (open_clip's own autocast and input dtype).

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
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from open_clip_sigrel.io import format_table as _format_table
from open_clip_sigrel.tools.eval_data import (
    EvalError,
    _first_msg,
    _torch_load,
    build_loader,
    load_embeddings,
    resolve_data,
)

__all__ = ["EvalConfig", "evaluate", "create_model", "encode", "save_result", "format_table"]

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")


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
