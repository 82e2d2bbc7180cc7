"""``GeometryMetric``: geometry_metrics as an object with mergeable state (update / merge / compute).

Like a torchmetrics ``Metric``: the state is declared with its distributed reduction
(``add_state(name, dist_reduce_fx)``), ``update`` is called per batch (per rank), ``merge`` folds in
another instance's state, ``compute`` gathers every rank's state when torch.distributed is initialised
and returns exactly ``geometry_metrics`` of the concatenated features, ``reset`` empties the state.

Why the state is the features themselves ("cat"): the worst-case margin, the exact percentiles, the
retrieval ranks and the loss all involve the pairs *across* batches and ranks (x_i of one rank against
y_j of another), so no fixed-size summary gives the same numbers. The state is O(N d); the work stays
in one call to ``geometry_metrics`` at the end.

Several captions per image (``update(images, captions, text_image=owner)``, the convention of
``geometry_metrics``): each update also records its segment (#images, #captions) and the captions'
owners within the update; after the gather (segments in rank order, then update order) each owner is
shifted by the images before its segment, so the result equals one call on the concatenated features.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
>>> m = GeometryMetric(metrics=("margins", "retrieval"))
>>> m.update(x[:3], y[:3]); m.update(x[3:], y[3:])
>>> m.compute() == geometry_metrics(x, y, metrics=("margins", "retrieval"))
True
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from open_clip_sigrel.metrics.geometry import geometry_metrics, metric_groups
from open_clip_sigrel.metrics.inputs import caption_owners, to_tensor

__all__ = ["GeometryMetric"]

DIST_REDUCE_FXS = ("cat",)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # wire codes of the gather


class GeometryMetric:
    """Mergeable geometry metrics of matched (image, text) pairs seen over several batches or ranks.

    Args:
        metrics: the groups of ``geometry_metrics`` to compute (None: all); checked here.
        logit_scale, logit_bias: t and open_clip's bias, as for ``geometry_metrics`` (fixed for the run).
        chunk_size: passed to ``geometry_metrics``.
        sync_on_compute: gather every rank's state in ``compute`` when torch.distributed is initialised
            (every rank must then call ``compute``; each gets the same dict).
        process_group: the group to gather over (default: the world).
    """

    def __init__(self, metrics: str | Iterable[str] | None = None, *, logit_scale: Any = None,
                 logit_bias: Any = None, chunk_size: int | None = None, sync_on_compute: bool = True,
                 process_group=None):
        # read once (a generator too); an unknown group fails here, not after the evaluation loop
        self.metrics = None if metrics is None else metric_groups(metrics)
        self.logit_scale, self.logit_bias, self.chunk_size = logit_scale, logit_bias, chunk_size
        self.sync_on_compute, self.process_group = sync_on_compute, process_group
        self._reductions: dict[str, str] = {}
        self.add_state("image_features", dist_reduce_fx="cat")
        self.add_state("text_features", dist_reduce_fx="cat")
        # float64 columns gather like the features (integers < 2^53 are exact): each caption's image
        # within its update, and per update (#images, #captions)
        self.add_state("text_image", dist_reduce_fx="cat")
        self.add_state("segments", dist_reduce_fx="cat")

    # -- state
    def add_state(self, name: str, dist_reduce_fx: str = "cat") -> None:
        """Declares a state and how ranks combine it ("cat": rows concatenated in rank order)."""
        if dist_reduce_fx not in DIST_REDUCE_FXS:
            raise ValueError(f"dist_reduce_fx {dist_reduce_fx!r} is not one of {', '.join(DIST_REDUCE_FXS)}")
        self._reductions[name] = dist_reduce_fx
        setattr(self, name, [])

    def reset(self) -> None:
        for name in self._reductions:
            setattr(self, name, [])

    @property
    def n_pairs(self) -> int:
        """(image, caption) pairs held locally (this rank): one per caption."""
        return sum(t.shape[0] for t in self.text_features)

    def update(self, image_features: Any, text_features: Any, text_image: Any = None) -> None:
        """Adds a batch: matched pairs (row i of each is pair i), or with ``text_image`` several captions per
        image (caption j belongs to image ``text_image[j]`` of this batch). The state keeps its own copy."""
        x, y = to_tensor(image_features, "image_features"), to_tensor(text_features, "text_features")
        for name, t in (("image_features", x), ("text_features", y)):
            if t.ndim != 2:
                raise ValueError(f"{name} must be 2-D (batch, d), got shape {tuple(t.shape)}")
        if text_image is None and x.shape != y.shape:
            raise ValueError(f"image_features and text_features must have the same shape (matched pairs), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}; several captions per image need text_image")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"image_features and text_features must have the same dimension, got {x.shape[1]} "
                             f"and {y.shape[1]}")
        if x.device != y.device:
            raise ValueError(f"image_features is on {x.device} but text_features on {y.device}")
        if self.image_features:
            first = self.image_features[0]
            if x.shape[1] != first.shape[1]:
                raise ValueError(f"features have dimension {x.shape[1]}, earlier batches {first.shape[1]}")
            if x.device != first.device:
                raise ValueError(f"features are on {x.device}, earlier batches on {first.device}")
        owner = (torch.arange(x.shape[0], device=x.device) if text_image is None
                 else caption_owners(text_image, x.shape[0], y.shape[0], x.device))
        self.image_features.append(x.clone())
        self.text_features.append(y.clone())
        self.text_image.append(owner.to(torch.float64).reshape(-1, 1))
        self.segments.append(torch.tensor([[x.shape[0], y.shape[0]]], dtype=torch.float64, device=x.device))

    def merge(self, other: GeometryMetric) -> GeometryMetric:
        """Folds ``other``'s state into this one (its pairs after ours); returns self."""
        if not isinstance(other, GeometryMetric):
            raise TypeError(f"can only merge a GeometryMetric, got {type(other).__name__}")
        if other._reductions != self._reductions:
            raise ValueError("cannot merge metrics with different states")
        if self.image_features and other.image_features:
            a, b = self.image_features[0], other.image_features[0]
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"cannot merge features of dimension {b.shape[1]} into dimension {a.shape[1]}")
            if a.device != b.device:
                raise ValueError(f"cannot merge features on {b.device} into features on {a.device}")
        for name in self._reductions:
            getattr(self, name).extend(getattr(other, name))
        return self

    def _local_state(self) -> dict[str, torch.Tensor | None]:
        return {name: torch.cat(getattr(self, name)) if getattr(self, name) else None for name in self._reductions}

    def sync_state(self, process_group=None) -> dict[str, torch.Tensor | None]:
        """Every rank's state, reduced (rows concatenated in rank order); the local state is unchanged.

        A collective: every rank of the group must call it. Shards may differ in size (a rank may hold
        none): sizes are exchanged first, shards padded to the largest and trimmed after all_gather.
        """
        import torch.distributed as dist

        group = process_group if process_group is not None else self.process_group
        state = self._local_state()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return state
        return {name: _all_gather_rows(state[name], group, name) for name in self._reductions}

    def compute(self) -> dict[str, float]:
        """``geometry_metrics`` of every pair seen (all ranks' when distributed and sync_on_compute)."""
        state = self.sync_state() if self.sync_on_compute else self._local_state()
        x, y = state["image_features"], state["text_features"]
        if x is None:
            raise ValueError("GeometryMetric.compute() before any update: no pairs")
        return geometry_metrics(x, y, self.logit_scale, self.logit_bias, metrics=self.metrics,
                                chunk_size=self.chunk_size, text_image=_global_owners(state))


def _global_owners(state: dict) -> torch.Tensor | None:
    """Each caption's image in the concatenated features (None: one caption per image, in order)."""
    segments = state["segments"].to(torch.int64)
    local = state["text_image"].reshape(-1).to(torch.int64)
    images_before = torch.cumsum(segments[:, 0], 0) - segments[:, 0]
    owner = local + torch.repeat_interleave(images_before, segments[:, 1])
    n = int(segments[:, 0].sum())
    if owner.numel() == n and torch.equal(owner, torch.arange(n, device=owner.device)):
        return None
    return owner


def _all_gather_rows(local: torch.Tensor | None, group, name: str) -> torch.Tensor | None:
    """Concatenation over ranks (rank order) of (n_r, d) shards of different n_r; None if all are empty."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if local is not None:
        device = local.device
    elif dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    meta = torch.tensor([-1, -1, -1] if local is None else [local.shape[0], local.shape[1], _DTYPES.index(local.dtype)],
                        dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.tolist() for m in metas]
    held = [m for m in metas if m[0] >= 0]
    if not held:
        return None
    dims = {m[1] for m in held}
    if len(dims) > 1:  # every rank sees the same metas, so every rank raises
        raise ValueError(f"{name}: ranks hold features of different dimensions {sorted(dims)}")
    d = dims.pop()
    dtype = _DTYPES[held[0][2]]
    for m in held[1:]:
        dtype = torch.promote_types(dtype, _DTYPES[m[2]])  # as torch.cat of the shards would
    rows = max(m[0] for m in held)
    buf = torch.zeros((rows, d), dtype=dtype, device=device)
    if local is not None:
        buf[:local.shape[0]] = local
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return torch.cat([b[:m[0]] for b, m in zip(bufs, metas) if m[0] > 0])
