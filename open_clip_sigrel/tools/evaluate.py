"""Geometry metrics of an open_clip checkpoint on local data, or of saved embeddings.

The library side of ``open-clip-sigrel eval`` (its command line is open_clip_sigrel.cli.evaluate)::

    open-clip-sigrel eval --model sigrel-tiny --pretrained ckpt.pt --data 'val/{0..3}.tar' --output out.json
    open-clip-sigrel eval --embeddings emb.npz --output out.json --plots figs/
    open-clip-sigrel eval --hf-model ./siglip-checkpoint --data digits/ --split val --output out.json

Settings: :class:`EvalConfig` (its fields are the flags); what ``data`` and ``embeddings`` may be
is in ``open_clip_sigrel.tools.eval_data``, which reads and checks them. Precision as open_clip's
``--precision`` (open_clip's own autocast and input dtype).

Every input is checked before the work starts (model name and tag, the checkpoint's and embeddings'
pickled objects, each local shard's tar structure, the CSV's columns and image files); a failure
raises :class:`EvalError` (a ValueError) naming the file or setting. :func:`evaluate` returns
clip_benchmark's JSON shape, so that ``clip_benchmark build`` tabulates it with its own results:
``{"model", "pretrained", "dataset", "language", "task": "geometry", "metrics", "dataset_path"[, "split"]}``
with string ``model`` / ``pretrained`` (``--hf-model``: its path or name / "huggingface"; embeddings:
``--model`` / ``--pretrained`` as labels, default "embeddings" / the file name), ``dataset`` a name
(``wds/<folder>``, ``csv/<stem>``, ``embeddings/<stem>``; ``--dataset-name`` sets it) and the path
in ``dataset_path``. The metrics are those of ``open_clip_sigrel.metrics.geometry`` (all groups: the
retrieval numbers also under clip_benchmark's names, computed its way); :func:`save_result` writes
the JSON atomically.

Hugging Face ``SiglipModel`` / ``Siglip2Model`` checkpoints (``--hf-model``, the ``hf`` extra:
transformers) are encoded with their own image processor and tokenizer (padding to max_length, as
SigLIP was trained) and their own t = exp(logit_scale) and logit_bias.
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

import numpy as np
import torch

from open_clip_sigrel.extras import require
from open_clip_sigrel.io import format_table as _format_table
from open_clip_sigrel.tools.eval_data import (
    EvalError,
    _first_msg,
    _torch_load,
    build_loader,
    dataset_name,
    load_embeddings,
    resolve_data,
)

__all__ = ["EvalConfig", "evaluate", "create_model", "create_hf_model", "HFSiglip", "encode", "save_result",
           "format_table"]

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how: the defaults of :func:`evaluate` and of ``open-clip-sigrel eval``'s flags."""

    model: str | None = field(default=None, metadata={
        "help": "open_clip model name (built-in, registered, 'hf-hub:org/repo' or 'local-dir:path')"})
    pretrained: str | None = field(default=None, metadata={"help": "pretrained tag of --model or a checkpoint file"})
    hf_model: str | None = field(default=None, metadata={
        "help": "Hugging Face SiglipModel / Siglip2Model folder or hub name (instead of --model; the 'hf' extra)"})
    model_config: str | None = field(default=None, metadata={
        "help": "model config JSON (bare or open_clip hub format) to register before creating the model"})
    data: str | None = field(default=None, metadata={
        "help": "webdataset shards ('dir/{0..3}.tar'), a .csv/.tsv file, or a clip_benchmark folder"})
    embeddings: str | None = field(default=None, metadata={
        "help": ".npz or .pt with arrays 'image' and 'text' (+ optional 'logit_scale' t, 'logit_bias')"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "dataset name in the result (default: wds/<folder>, csv/<stem> or embeddings/<stem>)"})
    language: str = field(default="en", metadata={"help": "language recorded in the result (clip_benchmark's key)"})
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
        if self.model and self.hf_model:
            raise EvalError("give one of --model (open_clip) or --hf-model (Hugging Face), not both")
        if self.data is not None and not (self.model or self.hf_model):
            raise EvalError("--data needs --model or --hf-model")
        if self.embeddings is not None and self.hf_model:
            raise EvalError("--hf-model encodes --data; --embeddings are already encoded")
        for name, (lo, hi) in _INT_RANGES.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise EvalError(f"--{name.replace('_', '-')} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise EvalError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
        if self.precision not in PRECISIONS:
            raise EvalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


#: the integer settings' ranges (the upper ends keep a typo from allocating or spawning without end)
_INT_RANGES = {"batch_size": (1, 1 << 16), "workers": (0, 256), "chunk_size": (1, 1 << 22),
               "max_samples": (1, 1 << 40)}

#: EvalConfig's fields by what they are about (the command line's argument groups).
SOURCE_FIELDS = ("model", "pretrained", "hf_model", "model_config", "data", "embeddings")
DATA_FIELDS = ("dataset_name", "language", "split", "csv_img_key", "csv_caption_key", "csv_separator",
               "max_samples")
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
        raise EvalError(f"unknown model '{model}': not an open_clip model{hint}; a Hugging Face SigLIP "
                        "checkpoint goes to --hf-model")
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


# -------------------------------------------------------------------------- Hugging Face SigLIP
HF_CLASSES = ("SiglipModel", "Siglip2Model")


class HFSiglip(torch.nn.Module):
    """A transformers SiglipModel / Siglip2Model seen as open_clip's model: encode_image / encode_text,
    logit_scale (log t) and logit_bias, so that encode() and the result code serve both."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias

    @staticmethod
    def _features(out, normalize: bool) -> torch.Tensor:
        f = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_image(self, images: dict, normalize: bool = False) -> torch.Tensor:
        return self._features(self.model.get_image_features(**images), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        names = self.input_names  # tokens: (B, len(names), L), the tokenizer's outputs stacked
        return self._features(self.model.get_text_features(**dict(zip(names, tokens.unbind(1)))), normalize)


def create_hf_model(config: EvalConfig, device: torch.device):
    """(HFSiglip, preprocess, tokenizer) of ``config.hf_model``; EvalError for a checkpoint that is no
    SiglipModel / Siglip2Model or lacks a trained logit_bias (transformers would initialise it randomly)."""
    transformers = require("transformers", "hf")
    name = config.hf_model
    if not Path(name).is_dir() and (Path(name).exists() or name.count("/") != 1):
        raise EvalError(f"--hf-model {name}: neither a checkpoint folder nor a hub name 'org/model'")
    try:
        model, info = transformers.AutoModel.from_pretrained(name, output_loading_info=True)
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError (no such folder / repo, offline), ValueError (unknown config)
        raise EvalError(f"could not load the Hugging Face checkpoint {name}: {type(e).__name__}: {_first_msg(e)}") from e
    kind = type(model).__name__
    if kind not in HF_CLASSES:
        raise EvalError(f"--hf-model {name} is a {kind}; expected one of {', '.join(HF_CLASSES)} (a sigmoid "
                        "model with logit_scale and logit_bias)")
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[-1] in ("logit_bias", "logit_scale")]
    if missing:
        raise EvalError(f"--hf-model {name}: the checkpoint has no {' / '.join(missing)} (transformers would "
                        "initialise it randomly); save the model with its trained logit_scale and logit_bias")
    dtype = {"pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}.get(config.precision)
    model = model.to(device=device, dtype=dtype).eval()
    wrapped = HFSiglip(model)
    wrapped.input_names = list(getattr(tokenizer, "model_input_names", ["input_ids"]))
    text_cfg = getattr(model.config, "text_config", None)
    max_length = getattr(text_cfg, "max_position_embeddings", None) or 64

    def preprocess(image):
        return {k: v[0] for k, v in processor(images=image, return_tensors="pt").items()}

    def tokenize(texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return torch.stack([out[k] for k in wrapped.input_names], 1)

    return wrapped, preprocess, tokenize


def _to_device(images, device: torch.device, dtype):
    if isinstance(images, dict):
        return {k: _to_device(v, device, dtype) for k, v in images.items()}
    return images.to(device=device, dtype=dtype) if dtype is not None and images.is_floating_point() \
        else images.to(device)


@torch.no_grad()
def encode(model, loader, config: EvalConfig, device: torch.device, *, progress: bool = False):
    """Normalised (image, text) features, float32, on ``device``, and the image index of each text.

    Several captions per image give several texts (see ``eval_data``); the index is None when every
    image has exactly one. ``config.max_samples`` counts images. Autocast and input dtype are open_clip's
    own for ``config.precision``; ``progress`` shows a tqdm bar on stderr.
    """
    import open_clip
    from open_clip_train.precision import get_autocast
    from tqdm import tqdm

    feats_i, feats_t, counts, n = [], [], [], 0
    in_dtype = open_clip.get_input_dtype(config.precision)
    autocast = get_autocast(config.precision, device_type=device.type)
    limit = config.max_samples
    bar = tqdm(total=limit, desc="encoding", unit="image", disable=not progress, dynamic_ncols=True)
    try:
        for images, tokens, per_image, errors in loader:
            if errors:
                raise EvalError(errors[0])
            if limit is not None and n + len(per_image) > limit:
                per_image = per_image[: limit - n]
                images = (images[: limit - n] if not isinstance(images, dict)
                          else {k: v[: limit - n] for k, v in images.items()})
                tokens = tokens[: sum(per_image)]
            with autocast():
                fi = model.encode_image(_to_device(images, device, in_dtype), normalize=True)
                ft = model.encode_text(tokens.to(device), normalize=True)
            feats_i.append(fi.float())
            feats_t.append(ft.float())
            counts.extend(per_image)
            n += len(per_image)
            bar.update(len(per_image))
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
    owner = None
    if any(c != 1 for c in counts):
        owner = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(counts, device=device))
    return torch.cat(feats_i), torch.cat(feats_t), owner


# ------------------------------------------------------------------------------------------- run
def evaluate(config: EvalConfig | None = None, *, progress: bool = False, **options: Any) -> tuple[dict, Any, Any]:
    """(result dict, image features, text features) of ``config`` (with fields as keyword overrides);
    with several captions per image the features are those of the (image, caption) pairs, one row each.

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
    result: dict[str, Any] = {}
    if cfg.embeddings is not None:
        emb = load_embeddings(cfg.embeddings)
        image, text, owner = emb["image"], emb["text"], emb.get("text_image")
        if cfg.max_samples is not None:
            image = image[: cfg.max_samples]
            if owner is None:
                text = text[: cfg.max_samples]
            else:  # the captions of the images kept
                keep = np.asarray(owner) < cfg.max_samples
                text, owner = text[keep], np.asarray(owner)[keep]
        scale, bias = emb.get("logit_scale"), emb.get("logit_bias")
        model_name, pretrained = cfg.model or "embeddings", cfg.pretrained or Path(cfg.embeddings).name
        name, path = f"embeddings/{Path(cfg.embeddings).stem}", str(cfg.embeddings)
    else:
        kind, source, split = resolve_data(cfg)
        if cfg.hf_model:
            model, preprocess, tokenizer = create_hf_model(cfg, device)
            model_name, pretrained = cfg.hf_model, "huggingface"
        else:
            model, preprocess, tokenizer = create_model(cfg, device)
            model_name, pretrained = cfg.model, cfg.pretrained or ""
        loader = build_loader(kind, source, preprocess, tokenizer, cfg)
        image, text, owner = encode(model, loader, cfg, device, progress=progress)
        scale = float(model.logit_scale.detach().float().exp().mean())
        lb = getattr(model, "logit_bias", None)
        bias = None if lb is None else float(lb.detach().float().mean())
        name, path = dataset_name(kind, source, cfg.data), str(cfg.data)
        if split is not None:
            result["split"] = split
    result = {"model": str(model_name), "pretrained": str(pretrained), "dataset": cfg.dataset_name or name,
              "language": cfg.language, "task": "geometry", "dataset_path": path, **result}
    try:
        metrics = geometry_metrics(image, text, logit_scale=scale, logit_bias=bias, chunk_size=cfg.chunk_size,
                                   text_image=owner)
    except ValueError as e:
        raise EvalError(str(e)) from e
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise EvalError(f"non-finite metrics: {', '.join(bad)}")
    result["metrics"] = metrics
    if owner is not None:  # the features of the (image, caption) pairs, one row each (plots)
        image = torch.as_tensor(image)[torch.as_tensor(owner, dtype=torch.int64, device=torch.as_tensor(image).device)]
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
