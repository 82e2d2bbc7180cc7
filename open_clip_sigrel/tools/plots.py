"""PNG figures of embedding geometry and training curves (matplotlib, Agg canvas, no pyplot state).

* ``plot_similarity_histograms``: matched vs unmatched cosine similarities (density-normalised), with
  the relative biases and margin bands of ``geometry_metrics`` marked.
* ``plot_modality_projection``: the usual modality-gap picture, a 2-D PCA (SVD of the centred,
  concatenated embeddings) coloured by modality with a subset of matched pairs joined.
* ``plot_training_curves``: t, b_rel, margins and retrieval over epochs from open_clip's results.jsonl.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open_clip_sigrel.extras import require
from open_clip_sigrel.io import read_jsonl
from open_clip_sigrel.metrics import margin_and_rel_bias, pair_statistics, prepare_features

FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plots").FigureCanvasAgg
Figure = require("matplotlib.figure", "plots").Figure
MaxNLocator = require("matplotlib.ticker", "plots").MaxNLocator

__all__ = ["plot_similarity_histograms", "plot_modality_projection", "plot_training_curves", "plot_panels"]

IMAGE_COLOR, TEXT_COLOR = "#1f77b4", "#d62728"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _sample_negatives(x: torch.Tensor, y: torch.Tensor, max_negatives: int) -> torch.Tensor:
    """All N(N-1) unmatched similarities if few enough, else a fixed random sample of pairs (seed 0)."""
    n = x.shape[0]
    if n * (n - 1) <= max_negatives:
        s = x @ y.T
        return s[~torch.eye(n, dtype=torch.bool, device=s.device)].to(torch.float64).cpu()
    g = torch.Generator().manual_seed(0)
    i = torch.randint(n, (max_negatives,), generator=g)
    j = torch.randint(n - 1, (max_negatives,), generator=g)
    j = j + (j >= i).long()  # uniform over j != i
    out = torch.empty(max_negatives, dtype=torch.float64)
    step = 1 << 16
    for lo in range(0, max_negatives, step):
        ii, jj = i[lo:lo + step].to(x.device), j[lo:lo + step].to(x.device)
        out[lo:lo + step] = (x[ii].to(torch.float64) * y[jj].to(torch.float64)).sum(1).cpu()
    return out


def plot_similarity_histograms(
    image_features: Any,
    text_features: Any,
    path: str | os.PathLike,
    metrics: Mapping[str, float] | None = None,
    *,
    bins: int = 100,
    max_negatives: int = 1_000_000,
    title: str | None = None,
) -> Path:
    """Histograms of matched s_ii (all) and unmatched s_ij (all, or ``max_negatives`` sampled pairs).

    Vertical lines: rel_bias_mean (from ``metrics`` or computed) and rel_bias_model when ``metrics``
    has it; shaded: the trimmed margin band [P95(neg), P5(pos)] and, when positive, the worst-case one.
    """
    x, y = prepare_features(image_features, text_features)
    n = x.shape[0]
    stats = pair_statistics(x, y)  # float64 in row blocks: no N x d float64 copies
    pos = stats.pos.cpu()
    neg = _sample_negatives(x, y, max_negatives)
    m = dict(metrics or {})
    if "rel_bias_mean" not in m:
        m["rel_bias_mean"] = margin_and_rel_bias(stats.pos_mean, stats.neg_mean)[1]

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    lo = min(float(pos.min()), float(neg.min()))
    hi = max(float(pos.max()), float(neg.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    sampled = "" if neg.numel() == n * (n - 1) else f", {neg.numel():,} sampled"
    ax.hist(neg.numpy(), bins=edges, density=True, alpha=0.55, color="#7f7f7f",
            label=f"unmatched s_ij ({n * (n - 1):,}{sampled})")
    ax.hist(pos.numpy(), bins=edges, density=True, alpha=0.55, color="#2ca02c", label=f"matched s_ii ({n:,})")
    if "margin_trimmed" in m and "rel_bias_trimmed" in m:
        b, mm = m["rel_bias_trimmed"], m["margin_trimmed"]
        ax.axvspan(b - abs(mm), b + abs(mm), color="#ff7f0e" if mm >= 0 else "#e377c2", alpha=0.15,
                   label=f"trimmed band P95(neg)..P5(pos), m = {mm:+.3f}")
    if m.get("margin_worst", -1.0) > 0 and "rel_bias_worst" in m:
        b, mm = m["rel_bias_worst"], m["margin_worst"]
        ax.axvspan(b - mm, b + mm, color="#9467bd", alpha=0.2, label=f"worst-case band, m* = {mm:.3f}")
    ax.axvline(m["rel_bias_mean"], color="k", ls="--", lw=1.2, label=f"b_rel mean = {m['rel_bias_mean']:.3f}")
    if "rel_bias_model" in m:
        ax.axvline(m["rel_bias_model"], color="#d62728", lw=1.5,
                   label=f"b_rel model = -logit_bias/t = {m['rel_bias_model']:.3f}")
    ax.set_xlabel("cosine similarity <x_i, y_j>")
    ax.set_ylabel("density")
    ax.set_title(title or "Matched vs unmatched similarities")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_modality_projection(
    image_features: Any,
    text_features: Any,
    path: str | os.PathLike,
    *,
    max_points: int = 5000,
    n_lines: int = 200,
    title: str | None = None,
) -> Path:
    """2-D PCA of the centred [x; y] (``max_points`` pairs at most, fixed sample), coloured by modality,
    with light lines joining ``n_lines`` matched pairs."""
    x, y = prepare_features(image_features, text_features)
    n = x.shape[0]
    if n > max_points:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_points].sort().values
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    k = x.shape[0]
    z = torch.cat([x, y]).to(torch.float64).cpu()
    z = z - z.mean(0)
    _, sv, vh = torch.linalg.svd(z, full_matrices=False)
    p = (z @ vh[:2].T).numpy()
    var = (sv**2 / (sv**2).sum()).numpy()
    px, py = p[:k], p[k:]
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot(1, 1, 1)
    lines = np.linspace(0, k - 1, min(n_lines, k)).astype(int)
    for i in lines:
        ax.plot([px[i, 0], py[i, 0]], [px[i, 1], py[i, 1]], color="0.6", lw=0.4, alpha=0.5, zorder=1)
    size = 8 if k <= 2000 else 3
    ax.scatter(px[:, 0], px[:, 1], s=size, c=IMAGE_COLOR, alpha=0.7, label="image", zorder=2)
    ax.scatter(py[:, 0], py[:, 1], s=size, c=TEXT_COLOR, alpha=0.7, label="text", zorder=2)
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}% of variance)" if var.size > 1 else "PC2")
    shown = f"{k:,} of {n:,} pairs" if k < n else f"{n:,} pairs"
    ax.set_title(title or f"Modality projection ({shown}; {len(lines)} pairs joined)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path)


_PANELS = (
    ("inverse temperature t", ("logit_scale",)),
    ("relative bias b_rel", ("rel_bias_model", "rel_bias_mean", "rel_bias_trimmed", "rel_bias_worst")),
    ("halved margin m", ("margin_mean", "margin_trimmed", "margin_worst")),
    ("retrieval recall", ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5",
                          "image_to_text_R@10", "text_to_image_R@10")),
)


def plot_training_curves(results_jsonl: str | os.PathLike, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """t, b_rel, margins and R@k against epoch from open_clip's results.jsonl (missing keys skipped)."""
    rows = read_jsonl(results_jsonl)
    panels = []
    for label, keys in _PANELS:
        series = []
        for key in keys:
            pts = [(r.get("epoch", i), r[key]) for i, r in enumerate(rows)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                series.append((key, pts))
        if series:
            panels.append((label, series))
    if not panels:
        wanted = sorted({k for _, keys in _PANELS for k in keys})
        raise ValueError(f"{results_jsonl}: no plottable metrics (looked for {', '.join(wanted)})")
    cols = 2 if len(panels) > 1 else 1
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.6 * rows_n))
    for k, (label, series) in enumerate(panels):
        ax = fig.add_subplot(rows_n, cols, k + 1)
        for key, pts in series:
            ex, ey = zip(*pts)
            ax.plot(ex, ey, marker="o", ms=3, label=key)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        if all(float(e).is_integer() for _, pts in series for e, _ in pts):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1 or label != "inverse temperature t":
            ax.legend(fontsize=8)
        if label == "halved margin m":
            ax.axhline(0, color="k", lw=0.8)
    fig.suptitle(title or f"Training curves ({Path(results_jsonl).name})")
    fig.tight_layout()
    return _save(fig, path)


def plot_panels(panels: list[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> None:
    """Line panels side by side (synth report): each {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}}.

    Writes PNG to ``path`` as given (any name: the report renders to a temporary file first)."""
    fig = Figure(figsize=(5.2 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, "o-", lw=1.2, ms=3, label=label)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
