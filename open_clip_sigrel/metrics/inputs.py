"""Inputs of the geometry metrics: validation, one device, the compute dtype, L2-normalised rows.

* ``prepare_features(image_features, text_features, text_image=None)`` -> (x, y): torch tensors or numpy
  arrays, (N, d) each, N >= 2, finite; computed in float64 if either is float64, else float32. Rows whose
  norm differs from 1 by more than 1e-5 (float32) / 1e-12 (float64) are normalised in a copy (each row
  scaled by its largest |entry| first, so rows of size 1e200 or 1e-200 neither overflow nor underflow);
  already-normalised inputs are used in place. With ``multi_caption=True`` the texts may be M != N rows
  (several captions per image). Raises ValueError naming the problem.
* ``caption_owners(text_image, n_images, n_texts, device)``: the (M,) int64 image index of each caption,
  checked (every image has at least one caption).
* ``to_tensor(a, name)``: a detached real floating tensor from a tensor or array (integers -> float64).
* ``row_blocks(n, d)``: row ranges of about 1M elements (float64 work on an (N, d) input in blocks).
* ``as_scalar(v, name)``: a finite Python float from a 1-element tensor / array / number.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["prepare_features", "caption_owners", "to_tensor", "row_blocks", "as_scalar"]


def to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(a).__name__}") from e
        if arr.dtype.kind not in "biufc":  # strings, structured records, objects, dates
            raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
        t = torch.as_tensor(arr)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def prepare_features(image_features: Any, text_features: Any, *, multi_caption: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, move to one device, choose the compute dtype, L2-normalise rows (copy only if needed).

    multi_caption: the texts are captions of the images (M rows, any M >= 1), not matched rows.
    """
    x = to_tensor(image_features, "image_features")
    y = to_tensor(text_features, "text_features")
    for name, t in (("image_features", x), ("text_features", y)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if multi_caption:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"image_features and text_features must have the same dimension, got "
                             f"{x.shape[1]} and {y.shape[1]}")
        if y.shape[0] < 1:
            raise ValueError("text_features has no rows (no captions)")
    elif x.shape != y.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (matched pairs), got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 pairs (N >= 2), got N = {n}")
    if d < 1:
        raise ValueError("features have dimension 0")
    if x.device != y.device:
        if isinstance(image_features, torch.Tensor) and not isinstance(text_features, torch.Tensor):
            y = y.to(x.device)
        elif isinstance(text_features, torch.Tensor) and not isinstance(image_features, torch.Tensor):
            x = x.to(y.device)
        else:
            raise ValueError(f"image_features is on {x.device} but text_features on {y.device}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return _normalise(x, dtype, "image_features"), _normalise(y, dtype, "text_features")


def row_blocks(n: int, d: int, elements: int = 1 << 20):
    step = max(1, elements // max(d, 1))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def caption_owners(text_image: Any, n_images: int, n_texts: int, device) -> torch.Tensor:
    """The image index of each caption as an (M,) int64 tensor on ``device``; ValueError naming the problem."""
    t = to_tensor(text_image, "text_image") if not isinstance(text_image, torch.Tensor) else text_image.detach()
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError("text_image must hold integer image indices")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"text_image must hold integer image indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.numel() != n_texts:
        raise ValueError(f"text_image must be 1-D with one image index per caption ({n_texts}), got shape "
                         f"{tuple(t.shape)}")
    owner = t.to(device=device, dtype=torch.int64)
    if n_texts and (int(owner.min()) < 0 or int(owner.max()) >= n_images):
        raise ValueError(f"text_image indices must lie in [0, {n_images}), got [{int(owner.min())}, {int(owner.max())}]")
    counts = torch.bincount(owner, minlength=n_images)
    if bool((counts == 0).any()):
        raise ValueError(f"image {int((counts == 0).nonzero()[0, 0])} has no caption (every image needs at least one)")
    return owner


_NORM_SAFE = (1e-150, 1e150)  # norms computed directly in float64 within this range


def _normalise(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    n, d = t.shape
    norms = torch.empty(n, dtype=torch.float64, device=t.device)  # of the rows scaled by their max |entry|
    scales = torch.empty(n, dtype=torch.float64, device=t.device)
    for lo, hi in row_blocks(n, d):
        b = t[lo:hi].to(torch.float64)
        if not torch.isfinite(b).all():
            bad = (~torch.isfinite(b)).any(1).nonzero()[0, 0].item() + lo
            raise ValueError(f"{name} contains NaN or Inf (first in row {bad})")
        nb = torch.linalg.vector_norm(b, dim=1)
        sb = torch.ones_like(nb)
        # scale first where ||b|| over- or underflows (entries ~1e200 / ~1e-200): by the row's max |entry|
        far = ~((nb > _NORM_SAFE[0]) & (nb < _NORM_SAFE[1]))
        if bool(far.any()):
            sb[far] = b[far].abs().amax(1)
            nb[far] = torch.linalg.vector_norm(b[far] / torch.where(sb[far] > 0, sb[far], 1.0)[:, None], dim=1)
        scales[lo:hi], norms[lo:hi] = torch.where(nb > 0, sb, 0.0), nb
    if (scales == 0).any():
        raise ValueError(f"{name} has an all-zero row (row {(scales == 0).nonzero()[0, 0].item()}); cannot normalise")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    if t.dtype == dtype and bool(((scales * norms - 1).abs() <= tol).all()):
        return t
    out = torch.empty((n, d), dtype=dtype, device=t.device)
    for lo, hi in row_blocks(n, d):
        out[lo:hi] = (t[lo:hi].to(torch.float64) / scales[lo:hi, None] / norms[lo:hi, None]).to(dtype)
    return out


def as_scalar(v: Any, name: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        v = v.detach().float().item() if v.dtype != torch.float64 else v.item()
    else:
        arr = np.asarray(v, dtype=np.float64)
        if arr.size != 1:
            raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
        v = float(arr.reshape(()))
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)
