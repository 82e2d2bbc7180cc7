"""Functional geometry metrics: one formula per function, no state.

Notation: x_i image, y_i text of pair i (L2-normalised), s_ij = <x_i, y_j>, N pairs; "pos" are the N
matched similarities s_ii, "neg" the N(N-1) unmatched s_ij (i != j).

Several captions per image (``text_image``: caption j belongs to image o(j)): N images, M captions, each
caption a text; the positives are the M similarities s_{o(j) j} (an image's captions are all its
positives), the negatives the N M - M others; "pairs" are the M (image, caption) pairs. With one caption
per image (o(j) = j) everything reduces to the formulas above.

The negatives are never held: the functions that need them take their statistics (max, mean, count
above a threshold, a percentile, rank counts), which ``geometry_metrics`` accumulates in one tiled
pass over X Y^T. Everything O(N d) is in ``pair_statistics`` (float64). Each function returns plain
Python numbers under the keys ``geometry_metrics`` reports.

* ``margin_and_rel_bias(pos, neg)``: THE halved margin / relative bias formula; every m, b_rel of the
  package (worst, mean, trimmed, the training telemetry's batch values) goes through it.
* ``margins``, ``trimmed_margins``, ``violations``: constellation metrics (Bangachev et al. 2025).
* ``modality_gap``: xi, centroid gap, centroid cosine distance, L2I, RMG, cones, alignment.
* ``retrieval``: R@k, mean and median rank both ways, from the rank counts.
* ``open_clip_sigrel.metrics.separability.linear_separability``: Thm 3.6's linear separability.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from open_clip_sigrel.metrics.inputs import caption_owners, prepare_features, row_blocks
from open_clip_sigrel.metrics.percentile import percentile

__all__ = [
    "margin_and_rel_bias", "PairStatistics", "pair_statistics", "margins", "trimmed_margins", "violations",
    "modality_gap", "retrieval", "RECALL_KS", "dot64",
]

RECALL_KS = (1, 5, 10)
_RMG_MIN_MATCH = 1e-3  # Schrodi et al. clamp D_match


def centred_gap_sum(x, y, mean=None):
    """sum_i ||z_i - zbar||^2 with z_i = x_i - y_i, over the rows (dim -2) of (..., n, d) tensors.

    xi = centred_gap_sum(x, y) / n is the spread of the pairs' differences around their mean (Bangachev et
    al. 2025, App. E); ``mean`` gives zbar when x, y are one block of a larger set (streamed sums).
    Leading dims are independent sets (batched runs).

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); y = torch.zeros(2, 2)
    >>> float(centred_gap_sum(x, y))
    1.0
    """
    z = x - y
    z = z - (z.mean(-2, keepdim=True) if mean is None else mean)
    return (z * z).sum((-1, -2))


def margin_and_rel_bias(pos, neg):
    """Halved margin and relative bias of a constellation from a positive and a negative similarity.

        m     = (pos - neg) / 2        b_rel = (pos + neg) / 2

    With pos = min_i s_ii and neg = max_{i != j} s_ij this is the paper's (m*, b*_rel) (Bangachev et
    al. 2025; m* > 0 iff the pairs form a constellation); with the means, Tab. 6's mean forms; with
    P5(pos) and P95(neg), Tab. 5's trimmed forms. Works on floats and (batched) tensors alike.

    >>> margin_and_rel_bias(0.9, 0.1)
    (0.4, 0.5)
    """
    return (pos - neg) / 2, (pos + neg) / 2


@dataclass(frozen=True)
class PairStatistics:
    """The O(N d) statistics of N matched pairs, float64 (see ``pair_statistics``)."""

    n: int  # pairs (M; = N with one caption per image)
    pos: torch.Tensor  # (M,) s_{o(j) j}
    sum_x: torch.Tensor  # (d,) sum_i x_i over the N images
    sum_y: torch.Tensor  # (d,) sum_j y_j over the M texts
    sq_x: float  # sum_i ||x_i||^2 (N up to rounding)
    sq_y: float
    l2i_sum: float  # sum_j ||x_o(j) - y_j||
    align_sum: float  # sum_j ||x_o(j) - y_j||^2
    xi_sum: float  # sum_j ||z_j - mean(z)||^2, z_j = x_o(j) - y_j
    n_image: int | None = None  # N (None: = n)

    @property
    def n_images(self) -> int:
        return self.n if self.n_image is None else self.n_image

    @property
    def n_neg(self) -> int:
        return self.n_images * self.n - self.n

    @property
    def pos_mean(self) -> float:
        return float(self.pos.sum()) / self.n

    @property
    def neg_mean(self) -> float:
        """mean of the negatives = (<sum x, sum y> - sum of the positives) / (N M - M): exact without them."""
        return (float(self.sum_x @ self.sum_y) - float(self.pos.sum())) / self.n_neg

    @property
    def cone_image(self) -> float:
        """mean_{i != i'} <x_i, x_i'> = (||sum x||^2 - sum ||x_i||^2) / (N (N - 1)), over the images."""
        n = self.n_images
        return (float(self.sum_x @ self.sum_x) - self.sq_x) / (n * (n - 1))

    @property
    def cone_text(self) -> float:
        """The same over the M texts (captions of one image included); 0 for a single text."""
        m = self.n
        return (float(self.sum_y @ self.sum_y) - self.sq_y) / (m * (m - 1)) if m > 1 else 0.0


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise <a_k, b_k> in float64: THE kernel of every matched similarity, and of the unmatched ones
    that retrieval compares with them (so that equal vectors give equal similarities: ties are ties)."""
    return (a.to(torch.float64) * b.to(torch.float64)).sum(1)


@torch.no_grad()
def pair_statistics(image_features: Any, text_features: Any, text_image: Any = None) -> PairStatistics:
    """Validates and normalises the pairs (``prepare_features``), then sums in float64 row blocks.

    text_image: the image index of each text (several captions per image); None: text i is image i's.

    >>> st = pair_statistics([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]])
    >>> st.pos.tolist(), st.pos_mean, st.neg_mean
    ([1.0, 0.0], 0.5, 0.5)
    """
    x, y = prepare_features(image_features, text_features, multi_caption=text_image is not None)
    owner = None if text_image is None else caption_owners(text_image, x.shape[0], y.shape[0], x.device)
    (n_img, d), m = x.shape, y.shape[0]
    f64 = torch.float64
    sx = torch.zeros(d, dtype=f64, device=x.device)
    sy = torch.zeros(d, dtype=f64, device=x.device)
    sqx = sqy = l2i = align = 0.0
    for lo, hi in row_blocks(n_img, d):
        xb = x[lo:hi].to(f64)
        sx += xb.sum(0)
        sqx += float((xb * xb).sum())

    def paired(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (x[lo:hi] if owner is None else x[owner[lo:hi]]), y[lo:hi]

    pos = torch.empty(m, dtype=f64, device=x.device)
    for lo, hi in row_blocks(m, d):
        xb, yb = paired(lo, hi)
        pos[lo:hi] = dot64(xb, yb)
        xb, yb = xb.to(f64), yb.to(f64)
        sy += yb.sum(0)
        sqy += float((yb * yb).sum())
        diff = xb - yb
        l2i += float(torch.linalg.vector_norm(diff, dim=1).sum())
        align += float((diff * diff).sum())
    if owner is None:
        zbar = (sx - sy) / m
    else:  # mean of z_j = x_o(j) - y_j: images weighted by their caption counts
        counts = torch.bincount(owner, minlength=n_img).to(f64)
        zbar = (sum(counts[lo:hi] @ x[lo:hi].to(f64) for lo, hi in row_blocks(n_img, d)) - sy) / m
    xi = sum(float(centred_gap_sum(*(t.to(f64) for t in paired(lo, hi)), zbar)) for lo, hi in row_blocks(m, d))
    return PairStatistics(m, pos, sx, sy, sqx, sqy, l2i, align, xi, None if owner is None else n_img)


def margins(pos: torch.Tensor, neg_max: float, neg_mean: float) -> dict[str, float]:
    """Worst-case and mean halved margins / relative biases (Bangachev et al. 2025, Tab. 6).

        margin_worst = (min_i s_ii - max_{i != j} s_ij) / 2     rel_bias_worst = (min + max) / 2
        margin_mean  = (mean_i s_ii - mean_{i != j} s_ij) / 2   rel_bias_mean  = (mean + mean) / 2

    pos: the N matched similarities; neg_max, neg_mean: max and mean of the unmatched ones.

    >>> r = margins(torch.tensor([0.9, 0.7], dtype=torch.float64), neg_max=0.3, neg_mean=0.1)
    >>> [round(r[k], 12) for k in ("margin_worst", "rel_bias_worst", "margin_mean", "rel_bias_mean")]
    [0.2, 0.5, 0.35, 0.45]
    """
    pos_mean = float(pos.sum(dtype=torch.float64)) / pos.numel()
    m_worst, b_worst = margin_and_rel_bias(float(pos.min()), float(neg_max))
    m_mean, b_mean = margin_and_rel_bias(pos_mean, float(neg_mean))
    return {"pos_sim_mean": pos_mean, "neg_sim_mean": float(neg_mean), "margin_worst": m_worst,
            "rel_bias_worst": b_worst, "margin_mean": m_mean, "rel_bias_mean": b_mean}


def trimmed_margins(pos: torch.Tensor, neg_p95: float) -> dict[str, float]:
    """Trimmed halved margin / relative bias (Bangachev et al. 2025, Tab. 5), numpy-'linear' percentiles:

        margin_trimmed = (P5(s_ii) - P95(s_ij, i != j)) / 2      rel_bias_trimmed = (P5 + P95) / 2

    >>> pos = torch.linspace(0.5, 0.9, 21, dtype=torch.float64)  # P5 = 0.52
    >>> r = trimmed_margins(pos, neg_p95=0.2)
    >>> round(r["margin_trimmed"], 12), round(r["rel_bias_trimmed"], 12)
    (0.16, 0.36)
    """
    m, b = margin_and_rel_bias(percentile(pos, 0.05), float(neg_p95))
    return {"margin_trimmed": m, "rel_bias_trimmed": b}


def violations(pos: torch.Tensor, neg_above: int, threshold: float) -> dict[str, float]:
    """Pairs on the wrong side of the relative bias b = ``threshold`` (where the sigmoid says 0.5):

        pos_violations = #{i : s_ii < b}       neg_violations = #{(i, j), i != j : s_ij > b}

    neg_above is the second count (from the pass over the negatives).

    >>> violations(torch.tensor([0.9, 0.2]), neg_above=3, threshold=0.5)
    {'violation_threshold': 0.5, 'pos_violations': 1, 'neg_violations': 3}
    """
    return {"violation_threshold": float(threshold), "pos_violations": int(torch.count_nonzero(pos < threshold)),
            "neg_violations": int(neg_above)}


def modality_gap(stats: PairStatistics) -> dict[str, float]:
    """Modality-gap metrics from the O(N d) statistics (``pair_statistics(image_features, text_features)``):

        xi                   mean_i ||z_i - mean(z)||^2, z_i = x_i - y_i         Bangachev et al. App. E
        gap_l2m              ||mean x - mean y||_2                                Liang et al. 2022
        gap_centroid_cosine  1 - cos(mean x, mean y)  (cos taken as 0 if a centroid is 0)   MTEB
        gap_l2i              mean_i ||x_i - y_i||_2                               Schrodi et al. 2025
        rmg                  D_m / (D_m + (D_img + D_txt) / 2), d(u, v) = (1 - cos(u, v)) / 2,
                             D_m = max(mean_i d(x_i, y_i), 1e-3), D_img / D_txt = mean_{i != j} d
                                                                                  Schrodi et al. 2025
        cone_image / _text   mean_{i != j} cos(x_i, x_j)  (resp. y)              Liang et al.; MTEB

    Several captions per image: xi, gap_l2i, alignment and D_m run over the M pairs (x_o(j), y_j); the
    centroids and cones over the N images and the M texts.
        alignment            mean_i ||x_i - y_i||^2                               Wang & Isola 2020

    >>> r = modality_gap(pair_statistics([[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]))
    >>> r["gap_l2m"], r["gap_l2i"], r["alignment"], r["cone_image"]
    (0.0, 1.4142135623730951, 2.0, 0.0)
    """
    n = stats.n
    mx, my = stats.sum_x / stats.n_images, stats.sum_y / n
    norm_mx, norm_my = float(torch.linalg.vector_norm(mx)), float(torch.linalg.vector_norm(my))
    centroid_cos = float(mx @ my) / (norm_mx * norm_my) if norm_mx > 0 and norm_my > 0 else 0.0
    cone_x, cone_y = stats.cone_image, stats.cone_text
    d_match = max(float(((1 - stats.pos) / 2).mean()), _RMG_MIN_MATCH)
    d_img, d_txt = (1 - cone_x) / 2, (1 - cone_y) / 2
    return {
        "xi": stats.xi_sum / n,
        "gap_l2m": float(torch.linalg.vector_norm(mx - my)),
        "gap_centroid_cosine": 1 - centroid_cos,
        "gap_l2i": stats.l2i_sum / n,
        "rmg": d_match / (d_match + (d_img + d_txt) / 2),
        "cone_image": cone_x,
        "cone_text": cone_y,
        "alignment": stats.align_sum / n,
    }


def retrieval(i2t_higher: torch.Tensor, t2i_higher: torch.Tensor, ks: Sequence[int] = RECALL_KS
              ) -> dict[str, float]:
    """Retrieval both ways from rank counts, as open_clip's ``get_clip_metrics`` reports it:

        rank_i = 1 + i2t_higher[i],  i2t_higher[i] = #{j : s_ij > s_ii}  (t2i: #{i : s_ij > s_jj})
        R@k = fraction of rank_i <= k;  mean_rank = mean rank_i;  median_rank = floor(median(rank - 1)) + 1

    Strict ">" counts: ties are resolved in the match's favour (deterministic; open_clip's argsort
    breaks them arbitrarily; clip_benchmark's topk by position: ``geometry``'s clip_benchmark group).
    Several captions per image: image i's rank counts the non-captions of i above its best caption;
    caption j's rank the other images above its own.

    >>> r = retrieval(torch.tensor([0, 0, 3, 7]), torch.tensor([0, 1, 0, 0]), ks=(1, 5))
    >>> r["image_to_text_R@1"], r["image_to_text_R@5"], r["image_to_text_mean_rank"], r["text_to_image_R@1"]
    (0.5, 0.75, 3.5, 0.75)
    """
    out: dict[str, float] = {}
    for name, cnt in (("image_to_text", i2t_higher), ("text_to_image", t2i_higher)):
        n = cnt.numel()
        for k in ks:
            out[f"{name}_R@{k}"] = float(torch.count_nonzero(cnt < k)) / n
        c = cnt.to(torch.float64)
        out[f"{name}_mean_rank"] = float(c.mean()) + 1
        out[f"{name}_median_rank"] = math.floor(float(np.median(c.cpu().numpy()))) + 1
    return out
