"""Geometry of a set of matched (image, text) embedding pairs, computed exactly and streamed.

Notation: x_i image, y_i text of pair i (row i of each input), both L2-normalised here;
s_ij = <x_i, y_j>; N pairs; "pos" are the N matched similarities s_ii, "neg" the N(N-1)
unmatched s_ij (i != j). t = exp(logit_scale) (pass t itself), open_clip's sign:
logit_ij = t * s_ij + logit_bias, so the relative bias is b_rel = -logit_bias / t
(``open_clip_sigrel.bias``).

``geometry_metrics(..., metrics=GROUPS)`` computes only the named groups (None: all of them); the
formulas live in ``metrics.functional`` (and ``metrics.separability``), this module runs the passes.

============  ===========================================================  ==================================
group         keys                                                         formula (see the functional)
============  ===========================================================  ==================================
(always)      n_pairs; with logit_scale: logit_scale,                      N; t; b_rel = -logit_bias / t
              logit_bias (else 0), rel_bias_model
margins       pos_sim_mean, neg_sim_mean, margin_worst, rel_bias_worst,    ``functional.margins``:
              margin_mean, rel_bias_mean                                   m* = (min s_ii - max s_ij) / 2 ...
trimmed       margin_trimmed, rel_bias_trimmed                             ``functional.trimmed_margins``:
                                                                           (P5(pos) -/+ P95(neg)) / 2, exact
violations    violation_threshold, pos_violations, neg_violations          ``functional.violations``, at
                                                                           b = rel_bias_model if logit_scale
                                                                           and logit_bias are given, else
                                                                           rel_bias_mean
separability  linear_separability                                          ``separability.linear_separability``
gap           xi, gap_l2m, gap_centroid_cosine, gap_l2i, rmg, cone_image,  ``functional.modality_gap``
              cone_text, alignment
uniformity    uniformity_image, uniformity_text                            log mean_{i != j} exp(-2 ||u_i -
                                                                           u_j||^2) (Wang & Isola 2020)
retrieval     {image_to_text,text_to_image}_{R@1,R@5,R@10,mean_rank,       ``functional.retrieval``
              median_rank}
clip_bench-   {image,text}_retrieval_recall@{1,5,10}                       clip_benchmark's zeroshot_retrieval:
mark                                                                       topk, ties broken by topk
loss          sigmoid_loss (with logit_scale)                              (sum_{i != j} softplus(z_ij) +
                                                                           sum_i softplus(-z_ii)) / N, z =
                                                                           t (s - b_rel): the loss kernel's
                                                                           ``pair_terms_``, sum in float64
============  ===========================================================  ==================================

``CHEAP_GROUPS`` (the training hook's default) leaves out ``trimmed`` (the exact percentile over the
N(N-1) negatives), ``separability`` (an L-BFGS fit) and ``clip_benchmark`` (a second pass).

Several captions per image (``text_image=``, caption j of image o(j); clip_benchmark's and COCO's
convention): each caption is a text, an image's positives are all its captions, so the margins,
percentiles, violations and the loss run over the M positives s_{o(j) j} and the N M - M negatives
(``sigmoid_loss`` divided by M); retrieval: an image is found at rank 1 + #{non-captions above its best
caption}, a caption at 1 + #{other images above its image}; the gap metrics as in
``functional.modality_gap``; ``linear_separability`` over the M pairs (an image once per caption).

Choices worth knowing:

* Ties in retrieval: open_clip ranks with ``argsort``, which breaks ties arbitrarily. Here the rank is
  1 + the number of items scoring *strictly* higher than the match (ties resolved in the match's
  favour), so the numbers are deterministic, and the rule holds exactly in float32 and float64: an
  unmatched similarity that the tile's product (compute dtype) puts within its rounding bound
  ((d + 4) eps) of the match is recomputed by the matched similarities' own kernel
  (``functional.dot64``), so equal vectors compare equal. The ``clip_benchmark`` group instead
  reproduces clip_benchmark 1.6's ``recall_at_k`` exactly (scores = texts @ images^T in the compute
  dtype, ``torch.topk``, whose tie order is by position in practice); k larger than the candidates
  (where clip_benchmark's topk fails) is left out.
* Exact trimmed percentile: P95 of the N(N-1) negatives equals ``np.percentile(neg, 95)`` of the dense
  set without holding it (``metrics.percentile``): the main pass feeds a ``BandSelect`` (rows are
  visited in a fixed random order, so the rows seen are a random sample; memory capped at 128 MiB);
  if it cannot verify its band, ``RadixSelect`` takes over with at most 2 (float32) / 4 (float64)
  extra passes.
* Precision: similarities are computed in float64 for float64 input and float32 otherwise; every sum,
  mean, count and the quantile interpolation is carried in float64 / int64. No N x N matrix is held:
  tiles of ``chunk_size`` rows (default 1024) by as many columns as make ~4M similarities. Passes over
  pairs: one over X Y^T (margins, trimmed, violations, retrieval, loss: whichever are asked, fused), half
  of X X^T and of Y Y^T (uniformity), plus rare refinement passes of the percentile. Cones, D_img /
  D_txt and the mean similarities come exactly from column sums (``functional.pair_statistics``).
* ``sigmoid_loss`` uses the package's one pair-sum kernel (``loss.kernel.pair_terms_``) on the X Y^T
  tiles, so it equals ``sigrel_loss(normalize="batch")`` and costs no extra N x N matmul.
* Inputs: ``metrics.inputs.prepare_features`` (validation; rows normalised in a copy only if needed).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from open_clip_sigrel.bias import rel_bias_from_logit_bias
from open_clip_sigrel.loss.kernel import pair_terms_
from open_clip_sigrel.metrics import functional as fn
from open_clip_sigrel.metrics import percentile as P
from open_clip_sigrel.metrics.inputs import as_scalar, caption_owners, prepare_features
from open_clip_sigrel.metrics.separability import linear_separability

__all__ = ["geometry_metrics", "metric_groups", "GROUPS", "ALL_GROUPS", "CHEAP_GROUPS", "PRESETS"]

# Elements of one tile of similarities (4M: 16 MiB in float32) and its default number of rows
# (1024 x 4096 tiles: the matmul reuses each text block across many rows, ~2x faster than thin rows).
_CHUNK_ELEMENTS = 1 << 22
_DEFAULT_ROWS = 1024
# Bytes the exact percentile selector may keep (values inside its band).
_SELECT_CAP_BYTES = 1 << 27
_TRIM_Q = 0.95

GROUPS: dict[str, tuple[str, ...]] = {
    "margins": ("pos_sim_mean", "neg_sim_mean", "margin_worst", "rel_bias_worst", "margin_mean", "rel_bias_mean"),
    "trimmed": ("margin_trimmed", "rel_bias_trimmed"),
    "violations": ("violation_threshold", "pos_violations", "neg_violations"),
    "separability": ("linear_separability",),
    "gap": ("xi", "gap_l2m", "gap_centroid_cosine", "gap_l2i", "rmg", "cone_image", "cone_text", "alignment"),
    "uniformity": ("uniformity_image", "uniformity_text"),
    "retrieval": tuple(f"{name}_{m}" for name in ("image_to_text", "text_to_image")
                       for m in (*(f"R@{k}" for k in fn.RECALL_KS), "mean_rank", "median_rank")),
    "loss": ("sigmoid_loss",),
    "clip_benchmark": tuple(f"{name}_retrieval_recall@{k}" for k in fn.RECALL_KS for name in ("image", "text")),
}
ALL_GROUPS = tuple(GROUPS)
CHEAP_GROUPS = tuple(g for g in GROUPS if g not in ("trimmed", "separability", "clip_benchmark"))
#: named sets of groups (the training hook's ``--sigrel-geometry``; "off": none)
PRESETS: dict[str, tuple[str, ...]] = {"cheap": CHEAP_GROUPS, "full": ALL_GROUPS, "off": ()}
_CROSS_GROUPS = frozenset({"margins", "trimmed", "violations", "retrieval", "loss"})  # need the X Y^T pass


def metric_groups(metrics: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The groups named by ``metrics`` (one name or several; None: all), in canonical order.

    >>> metric_groups(["retrieval", "margins"])
    ('margins', 'retrieval')
    """
    if metrics is None:
        return ALL_GROUPS
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if not isinstance(m, str) or m not in GROUPS]
    if unknown:
        raise ValueError(f"unknown geometry metric group(s) {', '.join(map(repr, unknown))}; "
                         f"valid groups: {', '.join(GROUPS)}")
    if not names:
        raise ValueError(f"metrics names no group; give None (all) or some of: {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


def _tiling(n: int, chunk_size: int | None) -> tuple[int, int]:
    """(rows, columns) of one tile of similarities: ~_CHUNK_ELEMENTS per tile, 1024 rows by default."""
    rows = min(n, _DEFAULT_ROWS) if chunk_size is None else min(n, int(chunk_size), _CHUNK_ELEMENTS)
    return rows, min(n, max(1, _CHUNK_ELEMENTS // rows))


def _uniformity(u: torch.Tensor, rows: int, cols: int) -> float:
    """log mean_{i != j} exp(-2 ||u_i - u_j||^2), with exp(-2 ||.||^2) = exp(4 cos - 4) for unit rows,
    summed in float64 over the upper triangle (tiles crossing the diagonal keep j > i)."""
    n = u.shape[0]
    total = 0.0
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        for c0 in range(lo, n, cols):
            e = torch.exp((u[lo:hi] @ u[c0:c0 + cols].T).mul_(4).sub_(4))
            if c0 < hi:  # the tile crosses the diagonal: keep column > row, i.e. j - i >= lo - c0 + 1
                e = torch.triu(e, diagonal=lo - c0 + 1)
            total += 2 * float(e.sum(dtype=torch.float64))
    return math.log(total / (n * (n - 1)))


def _refined_higher(near: torch.Tensor, s: torch.Tensor, hi: torch.Tensor, rx: torch.Tensor, cy: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, thr: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Per row (or column) of a tile: the correction of the tile's ``s > hi`` count over its ``near``
    entries, each decided instead by ``functional.dot64`` (the kernel of the matched similarities)
    against ``thr`` (float64, per row / column): +1 where dot64 says higher, -1 where the tile did."""
    r, c = near.nonzero(as_tuple=True)
    counts = torch.zeros(near.shape[0] if per_row else near.shape[1], dtype=torch.int64, device=near.device)
    step = max(1, (1 << 20) // max(x.shape[1], 1))
    for lo in range(0, r.numel(), step):
        rb, cb = r[lo:lo + step], c[lo:lo + step]
        at = rb if per_row else cb
        delta = (fn.dot64(x[rx[rb]], y[cy[cb]]) > thr[at]).to(torch.int64) - (s[rb, cb] > hi[at]).to(torch.int64)
        counts.index_add_(0, at, delta)
    return counts


def _cross_pass(x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor | None, pos: torch.Tensor, rows: int,
                cols: int, groups, threshold: float | None, t: float | None, b_rel: float | None) -> dict[str, Any]:
    """One pass over X Y^T in tiles (rows: the N images, columns: the M texts), doing only the requested
    groups' work; returns their statistics.

    Rows (and, when tiled, columns) go in a fixed random order, so that the part seen is a random
    sample and the percentile band can narrow during the pass. The positives (text j against its image
    o(j)) are set to -inf in each tile: below every threshold, out of every max and softplus(-inf) = 0
    in the loss.
    """
    n, m = x.shape[0], y.shape[0]
    dev, cdt, f64 = x.device, x.dtype, torch.float64
    want_max, want_trim = "margins" in groups, "trimmed" in groups
    want_viol, want_rank, want_loss = "violations" in groups, "retrieval" in groups, "loss" in groups
    own = owner if owner is not None else torch.arange(m, device=dev)
    gen = torch.Generator().manual_seed(0)
    perm_r = torch.randperm(n, generator=gen).to(dev)
    perm_c = torch.randperm(m, generator=gen).to(dev) if cols < m else torch.arange(m, device=dev)
    if owner is None:  # one caption per image: the positives are one entry per row, found by position
        col_of = torch.empty_like(perm_c)
        col_of[perm_c] = torch.arange(m, device=dev)  # position of text j in the column order
    n_neg = n * m - m
    cap = max(1024, _SELECT_CAP_BYTES // (torch.finfo(cdt).bits // 8))
    band = P.BandSelect(n_neg, _TRIM_Q, cap, cdt, dev) if want_trim else None
    if want_rank:
        # the match each count compares with: an image's best caption, a caption's own image (float64,
        # dot64); tol bounds the tile product's rounding ((d + 4) eps >= 2 gamma_d for unit rows): entries
        # above match + tol are higher for both kernels, and those near the match are recomputed by dot64
        best = torch.full((n,), -math.inf, dtype=f64, device=dev).scatter_reduce_(0, own, pos, "amax")
        tol = (x.shape[1] + 4) * torch.finfo(cdt).eps
        row_hi, col_hi = (best + tol).to(cdt), (pos + tol).to(cdt)
        row_mid, col_mid = best.to(cdt), pos.to(cdt)
        half = 2 * tol

    def tiles():
        """(rows idx, columns cidx, similarities with the positives at -inf, #masked, last tile?)."""
        for lo in range(0, n, rows):
            idx = perm_r[lo:lo + rows]
            xr = x[idx]
            for c0 in range(0, m, cols):
                cidx = perm_c[c0:c0 + cols]
                s = xr @ (y if cols == m else y[cidx]).T
                if owner is None:
                    diag = col_of[idx]
                    hit = ((diag >= c0) & (diag < c0 + cols)).nonzero().squeeze(1)
                    s[hit, diag[hit] - c0] = -math.inf
                    masked = hit.numel()
                else:
                    match = owner[cidx][None, :] == idx[:, None]
                    s.masked_fill_(match, -math.inf)
                    masked = int(torch.count_nonzero(match))
                yield idx, cidx, s, masked, c0 + cols >= m

    out: dict[str, Any] = {}
    i2t = torch.zeros(n, dtype=torch.int64, device=dev)
    t2i = torch.zeros(m, dtype=torch.int64, device=dev)
    neg_above = torch.zeros((), dtype=torch.int64, device=dev)
    neg_max = torch.tensor(-math.inf, dtype=cdt, device=dev)
    neg_loss = torch.zeros((), dtype=f64, device=dev)
    thr_c = torch.tensor(threshold if want_viol else 0.0, dtype=cdt, device=dev)
    row_count = buf = None
    ones = torch.ones(max(rows, cols), dtype=torch.float32, device=dev)
    for idx, cidx, s, n_masked, last in tiles():
        if want_rank:
            if row_count is None:
                row_count = torch.zeros(idx.numel(), dtype=torch.int64, device=dev)
            # Counting as 0/1 float32 matrix-vector products is exact (< 2^24) and ~2x faster than sum(bool).
            r, c = s.shape
            row_count += ((s > row_hi[idx, None]).to(torch.float32) @ ones[:c]).to(torch.int64)
            t2i[cidx] += (ones[:r] @ (s > col_hi[None, cidx]).to(torch.float32)).to(torch.int64)
            # entries within 2 tol of the match are recomputed by dot64 (a superset of the band where the
            # tile's rounding could decide wrongly; outside it both kernels agree): |s - match| once per
            # direction, its min, and only where it is small the mask and the recomputation
            buf = torch.empty_like(s) if buf is None or buf.shape != s.shape else buf
            torch.sub(s, row_mid[idx, None], out=buf).abs_()
            if float(buf.amin()) <= half:
                row_count += _refined_higher(buf <= half, s, row_hi[idx], idx, cidx, x, y, best[idx], per_row=True)
            torch.sub(s, col_mid[None, cidx], out=buf).abs_()
            if float(buf.amin()) <= half:
                t2i[cidx] += _refined_higher(buf <= half, s, col_hi[cidx], idx, cidx, x, y, pos[cidx],
                                             per_row=False)
        if want_viol:
            neg_above += torch.count_nonzero(s > thr_c)
        if want_max:
            neg_max = torch.maximum(neg_max, s.max())
        if want_loss:  # every entry a negative (the matched ones are -inf: no term); positives below
            # z = t (s - b_rel) formed as t s - t b_rel: b_rel itself rounded to float32 would bias every z
            neg_loss += pair_terms_(s.mul(t).sub_(t * b_rel), None, sum_dtype=f64)
        if band is not None:
            band.add(s, n_masked)
        if last:
            if want_rank:
                i2t[idx] = row_count
                row_count = None
            if band is not None:
                band.end_block(idx.numel())
    if want_rank:
        out["i2t"], out["t2i"] = i2t, t2i
    if want_viol:
        out["neg_above"] = int(neg_above)
    if want_max:
        out["neg_max"] = float(neg_max)
    if want_loss:
        # The positives as M independent 1 x 1 blocks, their pair on the diagonal: softplus(-z).
        z_pos = (pos - b_rel).mul_(t).view(m, 1, 1)
        out["loss_sum"] = float(neg_loss) + float(pair_terms_(z_pos, 0, sum_dtype=f64).sum())
    if band is not None:
        out["neg_p95"] = P.streamed_percentile(
            lambda: ((s, k) for _, _, s, k, _ in tiles()), n_neg, _TRIM_Q, cap, cdt, dev, band=band
        )
    return out


def _clip_benchmark_recall(x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor | None,
                           ks=fn.RECALL_KS) -> dict[str, float]:
    """clip_benchmark 1.6's zeroshot_retrieval recall@k, reproduced: scores = texts @ images^T; a text
    is found if its image is in its torch.topk(k) images, an image if one of its captions is in its
    torch.topk(k) texts (rows of scores^T); one topk call per k, as clip_benchmark makes them."""
    n, m = x.shape[0], y.shape[0]
    own = owner if owner is not None else torch.arange(m, device=x.device)
    out: dict[str, float] = {}
    hits = {k: 0 for k in ks if k <= n}
    step = max(1, _CHUNK_ELEMENTS // n)
    for lo in range(0, m, step):
        sc = y[lo:lo + step] @ x.T
        for k in hits:
            hits[k] += int((torch.topk(sc, k, dim=1)[1] == own[lo:lo + step, None]).any(1).sum())
    img_hits = {k: 0 for k in ks if k <= m}
    step = max(1, _CHUNK_ELEMENTS // m)
    for lo in range(0, n, step):
        sc = (y @ x[lo:lo + step].T).T  # clip_benchmark's rows of scores.T, a transposed view as there
        mine = torch.arange(lo, lo + sc.shape[0], device=x.device)[:, None]
        for k in img_hits:
            img_hits[k] += int((own[torch.topk(sc, k, dim=1)[1]] == mine).any(1).sum())
    for k in ks:
        if k in hits:
            out[f"image_retrieval_recall@{k}"] = hits[k] / m
        if k in img_hits:
            out[f"text_retrieval_recall@{k}"] = img_hits[k] / n
    return out


@torch.no_grad()
def geometry_metrics(
    image_features: Any,
    text_features: Any,
    logit_scale: Any = None,
    logit_bias: Any = None,
    *,
    metrics: str | Iterable[str] | None = None,
    chunk_size: int | None = None,
    text_image: Any = None,
) -> dict[str, float]:
    """Geometry metrics of N matched pairs (row i of each input is pair i); see the module table.

    Args:
        image_features, text_features: (N, d) torch tensors or numpy arrays, N >= 2; rows are
            L2-normalised here. Computed on the inputs' device.
        logit_scale: t, already exponentiated (optional; adds the model keys and ``sigmoid_loss``).
        logit_bias: open_clip's additive bias (optional, needs ``logit_scale``); b_rel = -logit_bias / t.
        metrics: the groups to compute (``GROUPS``: "margins", "trimmed", "violations", "separability",
            "gap", "uniformity", "retrieval", "loss"), one name or several; None: all. "loss" is computed
            only when logit_scale is given (skipped otherwise). Only their work is done; the X Y^T work of
            all of them is one pass.
        chunk_size: rows per tile of similarities (default 1024; a tile holds ~4M similarities).
        text_image: several captions per image: text_features holds M captions, caption j of image
            ``text_image[j]`` (every image needs one); see the module docstring. None: row i of each is pair i.

    Raises ValueError on NaN/Inf, non-2-D or mismatched inputs, N < 2, zero rows, bad scalars or an
    unknown group.

    >>> import torch
    >>> x = torch.eye(3); y = torch.eye(3)
    >>> geometry_metrics(x, y, metrics="margins")["margin_worst"]
    0.5
    """
    groups = metric_groups(metrics)
    x, y = prepare_features(image_features, text_features, multi_caption=text_image is not None)
    owner = None if text_image is None else caption_owners(text_image, x.shape[0], y.shape[0], x.device)
    n = x.shape[0]
    t_scale = None if logit_scale is None else as_scalar(logit_scale, "logit_scale")
    if t_scale is not None and t_scale <= 0:
        raise ValueError(f"logit_scale is t = exp(log scale) and must be > 0, got {t_scale}")
    if logit_bias is not None and t_scale is None:
        raise ValueError("logit_bias was given without logit_scale (t is needed for b_rel = -logit_bias / t)")
    l_bias = 0.0 if logit_bias is None else as_scalar(logit_bias, "logit_bias")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if t_scale is None:  # the loss is the model's: without t there is none (like the model keys)
        groups = tuple(g for g in groups if g != "loss")
    rows, _ = _tiling(n, chunk_size)
    cols = min(y.shape[0], max(1, _CHUNK_ELEMENTS // rows))  # the M texts
    rel_bias_model = None if t_scale is None else rel_bias_from_logit_bias(l_bias, t_scale)

    stats = fn.pair_statistics(x, y, owner)  # O(N d), float64: pos, column sums, gap sums
    threshold = None
    if "violations" in groups:
        threshold = rel_bias_model if (t_scale is not None and logit_bias is not None) else \
            fn.margin_and_rel_bias(stats.pos_mean, stats.neg_mean)[1]
    cross = (_cross_pass(x, y, owner, stats.pos, rows, cols, groups, threshold, t_scale, rel_bias_model)
             if _CROSS_GROUPS.intersection(groups) else {})

    out: dict[str, float] = {"n_pairs": stats.n}
    if owner is not None:
        out["n_images"] = n
    for group in groups:
        if group == "margins":
            out.update(fn.margins(stats.pos, cross["neg_max"], stats.neg_mean))
        elif group == "trimmed":
            out.update(fn.trimmed_margins(stats.pos, cross["neg_p95"]))
        elif group == "violations":
            out.update(fn.violations(stats.pos, cross["neg_above"], threshold))
        elif group == "separability":
            if owner is None:
                out["linear_separability"] = linear_separability(
                    x, y, means=(stats.sum_x / stats.n, stats.sum_y / stats.n))
            else:  # the M pairs: an image once per caption
                out["linear_separability"] = linear_separability(x[owner], y)
        elif group == "gap":
            out.update(fn.modality_gap(stats))
        elif group == "uniformity":
            out["uniformity_image"] = _uniformity(x, rows, cols)
            out["uniformity_text"] = _uniformity(y, rows, cols) if y.shape[0] > 1 else 0.0
        elif group == "retrieval":
            out.update(fn.retrieval(cross["i2t"], cross["t2i"]))
        elif group == "clip_benchmark":
            out.update(_clip_benchmark_recall(x, y, owner))
    if t_scale is not None:
        out.update({"logit_scale": t_scale, "logit_bias": l_bias, "rel_bias_model": rel_bias_model})
    if "loss" in groups:
        out["sigmoid_loss"] = cross["loss_sum"] / stats.n
    return out
