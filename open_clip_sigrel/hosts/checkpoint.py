"""Checkpoints that survive a kill, and resumes that cannot mix up optimizer state.

open_clip_train.main writes ``epoch_N.pt`` with a plain ``torch.save`` (a kill mid-write leaves a
truncated file) and ``--resume latest`` takes the newest ``*.pt`` by name, complete or not. The
adapters swap the names main looks up:

  torch (main's module name)   ``torch.save`` writes to ``<path>.partial-<pid>`` and renames it into
                               place, so a path holds a complete checkpoint or its previous content;
                               training checkpoints also get a ``"sigrel"`` entry (loss and freeze
                               flags) that the next resume compares.
  get_latest_checkpoint        the newest checkpoint that is complete (a zip with its central
                               directory); incomplete ones are named in the log and skipped.

Before work, ``check_resume(args)`` refuses a truncated ``--resume`` / ``--pretrained`` file and a
resume whose optimizer state belongs to another loss or other frozen scalars (its moments would be
loaded onto other parameters, or in other units: logit_bias = -t * b_rel).
"""
from __future__ import annotations

import argparse
import logging
import os
import types
import zipfile

import torch

from open_clip_sigrel.hosts.options import SigrelOptionError

_logger = logging.getLogger("open_clip_sigrel")
MARKER = "sigrel"  # the training checkpoint's entry: what its optimizer state was built for


def training_setup(args: argparse.Namespace) -> dict:
    """What a training checkpoint's optimizer state depends on: the loss and the frozen scalars."""
    loss = args.loss or ("siglip" if args.siglip else "clip")
    sigrel = loss == "sigrel"
    return {"loss": loss, "fixed_rel_bias": bool(sigrel and args.sigrel_fixed_rel_bias),
            "fixed_logit_scale": bool(sigrel and args.sigrel_fixed_logit_scale)}


def atomic_save(obj, path, *args, **kwargs) -> None:
    """torch.save to a temporary file beside ``path``, flushed, then renamed over it."""
    if not isinstance(path, (str, os.PathLike)):
        return torch.save(obj, path, *args, **kwargs)  # a buffer or file object: nothing to rename
    tmp = f"{os.fspath(path)}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f, *args, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_with_atomic_save(args: argparse.Namespace) -> types.ModuleType:
    """A stand-in for the ``torch`` name in open_clip_train.main: torch itself, but ``save`` is atomic and
    marks training checkpoints with the run's setup."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)

    def save(obj, path, *a, **kw):
        if isinstance(obj, dict) and "state_dict" in obj and "optimizer" in obj:
            obj = {**obj, MARKER: training_setup(args)}
        atomic_save(obj, path, *a, **kw)

    proxy.save = save
    return proxy


def incomplete(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): torch.save writes a zip whose
    central directory comes last, so a truncated write has none."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size == 0:
        return "is empty (0 bytes): a write that was interrupted"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x80\x02" or head[:1] == b"\x80":  # the legacy (pre-zip) pickle format
            return None
        return f"is truncated or not a torch checkpoint ({size} bytes, no zip central directory)"
    except OSError as e:
        return f"cannot be read ({e})"
    return None


def latest_complete_checkpoint(original, path: str, remote: bool):
    """open_clip's ``get_latest_checkpoint``, skipping (and naming) incomplete local checkpoints."""
    if remote:
        return original(path, remote)
    import glob

    from open_clip_train.main import natural_key

    for candidate in sorted(glob.glob(path + "**/*.pt", recursive=True), key=natural_key, reverse=True):
        why = incomplete(candidate)
        if why is None:
            return candidate
        _logger.warning(f"--resume latest: skipping {candidate}: it {why}")
    return None


def _local(path) -> bool:
    return isinstance(path, str) and "://" not in path and os.path.exists(path)


def check_resume(args: argparse.Namespace) -> None:
    """Before work: an explicit checkpoint must be complete, and a resumed optimizer state must belong
    to this run's loss and frozen scalars."""
    for flag, path in (("--resume", args.resume), ("--pretrained", getattr(args, "pretrained", None))):
        if _local(path) and os.path.isfile(path):
            why = incomplete(path)
            if why is not None:
                raise SigrelOptionError(f"{flag} {path}: the checkpoint {why}; give an earlier checkpoint")
    if _local(args.resume) and os.path.isfile(args.resume):
        check_resume_setup(args.resume, args)


def check_resume_setup(path: str, args: argparse.Namespace) -> None:
    """A resume whose optimizer state was built for another setup is refused, naming both."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy format cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
        return  # bare weights: open_clip loads them without optimizer state
    now, saved = training_setup(args), ckpt.get(MARKER)
    if saved == now or (saved is None and now["loss"] != "sigrel"):
        return  # a stock open_clip checkpoint resumed by a stock loss: open_clip's own business
    was = ("no record of its loss (a checkpoint of stock open_clip or of an earlier plugin)" if saved is None
           else ", ".join(f"{k} = {v}" for k, v in saved.items()))
    raise SigrelOptionError(
        f"--resume {path}: its optimizer state was built for {was}; this run has "
        f"{', '.join(f'{k} = {v}' for k, v in now.items())}. Resuming would load Adam moments onto other "
        f"parameters or in other units (logit_bias = -t * b_rel). Start from its weights with a fresh "
        f"optimizer instead: --pretrained {path} (and --epochs for the remaining ones)")
