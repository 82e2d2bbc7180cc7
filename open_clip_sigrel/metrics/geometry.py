"""Geometry of a set of matched (image, text) embedding pairs, computed exactly and streamed.

Notation: x_i image, y_i text of pair i (row i of each input), both L2-normalised here;
s_ij = <x_i, y_j>; N pairs; "pos" are the N matched similarities s_ii, "neg" the N(N-1)
unmatched s_ij (i != j). t = exp(logit_scale) (pass t itself), open_clip's sign:
logit_ij = t * s_ij + logit_bias, so the relative bias is b_rel = -logit_bias / t.

=========================  ==================================================================  ==========================
key                        formula                                                             source
=========================  ==================================================================  ==========================
n_pairs                    N
pos_sim_mean               mean_i s_ii
neg_sim_mean               mean_{i != j} s_ij
margin_worst               m* = (min_i s_ii - max_{i != j} s_ij) / 2  (> 0 iff constellation)  Bangachev et al. 2025
rel_bias_worst             b*_rel = (min_i s_ii + max_{i != j} s_ij) / 2                       Bangachev et al.
margin_mean                (pos_sim_mean - neg_sim_mean) / 2                                   Bangachev et al. Tab. 6
rel_bias_mean              (pos_sim_mean + neg_sim_mean) / 2                                   Bangachev et al. Tab. 6
margin_trimmed             (P5(pos) - P95(neg)) / 2, Pq = numpy's default ('linear') percentile  Bangachev et al. Tab. 5
rel_bias_trimmed           (P5(pos) + P95(neg)) / 2                                            Bangachev et al. Tab. 5
violation_threshold        b = rel_bias_model if logit_scale and logit_bias are given, else rel_bias_mean
pos_violations             #{i : s_ii < b}            (matched pairs the model's sigmoid calls < 0.5)
neg_violations             #{(i, j), i != j : s_ij > b}  (unmatched pairs it calls > 0.5)
linear_separability        best training accuracy of a linear classifier (with intercept) of      Bangachev et al. Thm 3.6
                           modality on the 2N points {x_i} u {y_i}; see below
xi                         mean_i ||z_i - mean(z)||^2,  z_i = x_i - y_i                         Bangachev et al. App. E
gap_l2m                    ||mean x - mean y||_2                                                Liang et al. 2022
gap_centroid_cosine        1 - cos(mean x, mean y)  (cos taken as 0 if a centroid is 0)         MTEB modality-gap script
gap_l2i                    mean_i ||x_i - y_i||_2                                               Schrodi et al. 2025
rmg                        D_m / (D_m + (D_img + D_txt) / 2), d(u, v) = (1 - cos(u, v)) / 2,    Schrodi et al. 2025
                           D_m = max(mean_i d(x_i, y_i), 1e-3), D_img = mean_{i != j} d(x_i, x_j),
                           D_txt = mean_{i != j} d(y_i, y_j)
cone_image, cone_text      mean_{i != j} cos(x_i, x_j)  (resp. y)                               Liang et al.; MTEB
uniformity_image / _text   log mean_{i != j} exp(-2 ||u_i - u_j||^2)                            Wang & Isola 2020
alignment                  mean_i ||x_i - y_i||^2                                               Wang & Isola 2020
image_to_text_R@k          fraction of i with rank_i <= k, rank_i = 1 + #{j : s_ij > s_ii}      open_clip get_clip_metrics
text_to_image_R@k          fraction of j with rank_j <= k, rank_j = 1 + #{i : s_ij > s_jj}      open_clip get_clip_metrics
*_mean_rank, *_median_rank mean rank; floor(median(rank - 1)) + 1, as open_clip                  open_clip get_clip_metrics
logit_scale                t (only when logit_scale is given)
logit_bias                 the given logit_bias, else 0
rel_bias_model             -logit_bias / t
sigmoid_loss               (sum_ij softplus(t (s_ij - b_rel)) - sum_i t (s_ii - b_rel)) / N     sigrel_loss(normalize="batch")
=========================  ==================================================================  ==========================

Choices worth knowing:

* Ties in retrieval: open_clip ranks with ``argsort``, which breaks ties arbitrarily. Here the rank is
  1 + the number of items scoring *strictly* higher than the match (ties resolved in the match's
  favour), so the numbers are deterministic. Matched similarities are computed as float64 row dot
  products, unmatched ones by the blockwise product in the compute dtype.
* Exact trimmed percentile: P95 of the N(N-1) negatives equals ``np.percentile(neg, 95)`` of the dense
  set (numpy's default 'linear' method: virtual index (M - 1) q, numpy's lerp between the two order
  statistics around it) without holding the set. The main pass keeps exact counts of values <= lo and
  the values in a band (lo, hi] (``_BandSelect``): the band starts as everything and is narrowed while
  the pass runs (rows are visited in a fixed random order, so the rows seen are a random sample; the
  margin is 6 standard errors of the observed block-to-block spread, memory capped at 128 MiB). At the
  end the exact counts verify that both order statistics lie in the band. If they do not (or the cap /
  massive ties forced the issue), ``_RadixSelect`` takes over: exact radix selection on order-preserving
  integer keys of the floats, 16 bits per extra pass (histogram of the next key digit among values
  sharing the chosen prefix; collect and select once <= cap values remain): at most 2 extra passes for
  float32, 4 for float64, exact with ties.
* Linear separability: the best training accuracy, on all 2N points (no subsampling; the features'
  float dtype), of three linear classifiers with intercept: the centroid classifier
  (w = mean x - mean y), full-batch L-BFGS (at most 300 iterations) on the unregularised squared hinge
  loss (an L2-SVM: its minimum is 0, hence accuracy 1, on every linearly separable set) and (at most
  100) on the logistic loss, both started from the centroid classifier. A point is called "image" when
  w.u + c > 0. Deterministic for a given machine. On non-separable sets it is a lower bound on the best
  linear accuracy (computing that exactly is NP-hard).
* Precision: similarities are computed in float64 for float64 input and float32 otherwise; every sum,
  mean, count and the quantile interpolation is carried in float64 / int64. No N x N matrix is held:
  tiles of ``chunk_size`` rows (default 1024) by as many columns as make ~4M similarities. Passes over pairs: one over
  X Y^T (everything cross-modal), half of X X^T and of Y Y^T (uniformity), plus rare refinement passes
  of the percentile. Cones, D_img / D_txt and the mean similarities come exactly from column sums.
* sigmoid_loss is the formula of ``open_clip_sigrel.loss.sigrel_loss`` (normalize="batch"; tested equal)
  fused into the X Y^T pass, so the loss costs no extra N x N matmul; sums in float64.
* Rows whose norm differs from 1 by more than 1e-5 (float32) / 1e-12 (float64) are normalised
  (in a copy); already-normalised inputs are used in place.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["geometry_metrics"]

# Elements of one tile of similarities (4M: 16 MiB in float32) and its default number of rows
# (1024 x 4096 tiles: the matmul reuses each text block across many rows, ~2x faster than thin rows).
_CHUNK_ELEMENTS = 1 << 22
_DEFAULT_ROWS = 1024
# Bytes the exact percentile selector may keep (values inside its band).
_SELECT_CAP_BYTES = 1 << 27
_RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------- inputs
def _to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(a).__name__}") from e
        if arr.dtype == object:
            raise ValueError(f"{name} must be a numeric array, got dtype object")
        t = torch.as_tensor(arr)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _prepare(image_features: Any, text_features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, move to one device, choose the compute dtype, L2-normalise rows (copy only if needed)."""
    x = _to_tensor(image_features, "image_features")
    y = _to_tensor(text_features, "text_features")
    for name, t in (("image_features", x), ("text_features", y)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if x.shape != y.shape:
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


def _row_blocks(n: int, d: int, elements: int = 1 << 20):
    step = max(1, elements // max(d, 1))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _normalise(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    n, d = t.shape
    norms = torch.empty(n, dtype=torch.float64, device=t.device)
    for lo, hi in _row_blocks(n, d):
        b = t[lo:hi].to(torch.float64)
        if not torch.isfinite(b).all():
            bad = (~torch.isfinite(b)).any(1).nonzero()[0, 0].item() + lo
            raise ValueError(f"{name} contains NaN or Inf (first in row {bad})")
        norms[lo:hi] = torch.linalg.vector_norm(b, dim=1)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row (row {(norms == 0).nonzero()[0, 0].item()}); cannot normalise")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    if t.dtype == dtype and bool(((norms - 1).abs() <= tol).all()):
        return t
    out = torch.empty((n, d), dtype=dtype, device=t.device)
    for lo, hi in _row_blocks(n, d):
        out[lo:hi] = (t[lo:hi].to(torch.float64) / norms[lo:hi, None]).to(dtype)
    return out


def _scalar(v: Any, name: str) -> float:
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


# ------------------------------------------------------------------------------ exact percentiles
def _linear_index(count: int, q: float) -> tuple[int, int, float]:
    """numpy 'linear' percentile: virtual index (count - 1) q -> (k0, k1, gamma), 0-based."""
    v = (count - 1) * q
    if v >= count - 1:
        return count - 1, count - 1, 0.0
    k0 = math.floor(v)
    return k0, k0 + 1, v - k0


def _lerp(a: float, b: float, g: float) -> float:
    """numpy's _lerp (the branch for g >= 0.5 keeps it monotone and exact at g = 1)."""
    diff = b - a
    return b - diff * (1 - g) if g >= 0.5 else a + diff * g


def _percentile_dense(values: torch.Tensor, q: float) -> float:
    """np.percentile(values, 100 q) of a 1-D tensor, in float64."""
    k0, k1, g = _linear_index(values.numel(), q)
    s = _sort(values)
    return _lerp(float(s[k0]), float(s[k1]), g)


def _sort(t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Sorted 1-D tensor (a copy unless ``inplace``); on CPU via numpy, without an index array."""
    if t.device.type == "cpu":
        if inplace:
            t.numpy().sort(kind="quicksort")
            return t
        return torch.from_numpy(np.sort(t.numpy(), kind="quicksort"))
    return torch.sort(t).values


class _BandSelect:
    """One adaptive pass towards the numpy-'linear' percentile of a streamed multiset (<= cap values kept).

    Keeps the exact count of values <= lo and the values in the band (lo, hi]. Values arrive as
    tiles (``add``) grouped into blocks of sampling units (``end_block(units)``: rows of the
    similarity matrix, visited in random order). Masked tile entries must be -inf (always <= lo;
    subtracted from the count). The band starts as everything; whenever more than ``cap`` values are
    held it is narrowed around the running estimate of the target with a margin of 6 standard errors
    (from the block-to-block spread of the fraction below the estimate, finite-population corrected;
    sqrt(q (1 - q)) per unit until 8 blocks are scored), keeping at most ``cap / 2`` values.
    ``finish`` returns True when both order statistics are verified inside the band (then ``result``
    is exact).
    """

    def __init__(self, total: int, q: float, cap: int, dtype: torch.dtype, device: torch.device):
        self.total, self.q, self.cap = total, q, max(int(cap), 16)
        self.k0, self.k1, self.gamma = _linear_index(total, q)
        self.dtype, self.device = dtype, device
        self.lo, self.hi = -math.inf, math.inf
        self.n_le = self.n_seen = self.n_buf = 0
        self.units_done = 0
        self.merged: torch.Tensor | None = None  # sorted band values kept at the last narrowing
        # completed blocks since then: (count <= lo, valid count, band values, units, scoreable)
        self.window: list[tuple[int, int, torch.Tensor | None, int, bool]] = []
        self.cur_pieces: list[torch.Tensor] = []  # the block in progress
        self.cur_le = self.cur_valid = 0
        self.cur_clean = True  # no narrowing inside this block yet (so it can be scored)
        self.scores: list[tuple[float, int]] = []  # per block: (fraction <= estimate, units)
        self.failed = False
        self.result: float | None = None

    def add(self, tile: torch.Tensor, n_masked: int = 0) -> None:
        n_valid = tile.numel() - n_masked
        self.n_seen += n_valid
        if self.failed:
            return
        mask = tile > self.lo  # masked entries (-inf) are never inside
        le = tile.numel() - int(torch.count_nonzero(mask)) - n_masked
        if self.hi != math.inf:
            mask &= tile <= self.hi
        vals = tile[mask]
        self.n_le += le
        self.cur_le += le
        self.cur_valid += n_valid
        self.cur_pieces.append(vals)
        self.n_buf += vals.numel()
        if self.n_buf > self.cap:
            self._narrow()

    def end_block(self, units: int = 1) -> None:
        self.units_done += units
        if not self.failed and self.cur_pieces:
            vals = torch.cat(self.cur_pieces)
            # a block cut by a narrowing keeps its remaining values but cannot be scored
            self.window.append((self.cur_le, self.cur_valid, vals, units, self.cur_clean))
        elif not self.failed and self.cur_clean and self.cur_valid:
            self.window.append((self.cur_le, self.cur_valid, None, units, True))
        self.cur_pieces, self.cur_le, self.cur_valid, self.cur_clean = [], 0, 0, True

    def _buffer(self) -> list[torch.Tensor]:
        parts = [self.merged] if self.merged is not None else []
        parts += [w[2] for w in self.window if w[2] is not None]
        return parts + self.cur_pieces

    def _narrow(self) -> None:
        buf = torch.cat(self._buffer())
        window = self.window  # unsorted values per completed block: for the spread estimate
        self.merged, self.window, self.cur_pieces = None, [], []
        self.cur_clean = False
        buf = _sort(buf, inplace=True)  # peak memory ~ 2 x cap
        p = self.n_seen
        center = self.q * (p - 1)
        ie = round(center) - self.n_le
        if ie < 0 or ie >= buf.numel():  # the estimate left the band: refine after this pass
            self._give_up()
            return
        est = float(buf[ie])
        for le, nv, vals, units, scoreable in window:
            if scoreable and nv:
                below = le + (int(torch.count_nonzero(vals <= est)) if vals is not None else 0)
                self.scores.append((below / nv, units))
        del window
        qq = self.q * (1 - self.q)
        if len(self.scores) >= 8:
            fr = np.array([f for f, _ in self.scores])
            per_unit = float(np.std(fr, ddof=1)) * math.sqrt(float(np.mean([u for _, u in self.scores])))
        else:
            per_unit = math.sqrt(qq)
        f = p / self.total
        units = max(1.0, self.units_done)
        se = max(per_unit, math.sqrt(qq / p)) * math.sqrt(max(0.0, 1 - f) / units)
        delta = 6 * se + 2.0 / p
        r_lo, r_hi = math.floor((self.q - delta) * (p - 1)), math.ceil((self.q + delta) * (p - 1))
        keep = self.cap // 2
        if r_hi - r_lo + 1 > keep:  # the memory cap wins over the margin; verified at the end
            r_lo, r_hi = round(center) - keep // 2, round(center) + keep // 2
        new_lo, new_hi = self.lo, self.hi
        if r_lo - 1 - self.n_le >= 0:
            new_lo = float(buf[r_lo - 1 - self.n_le])
            if new_lo >= est:  # keep the estimate and its ties inside the band
                j = int(torch.searchsorted(buf, buf[ie : ie + 1], right=False)) - 1
                new_lo = float(buf[j]) if j >= 0 else self.lo
        if r_hi - self.n_le < buf.numel() - 1:
            new_hi = float(buf[max(r_hi - self.n_le, ie)])
        edges = torch.tensor([new_lo, new_hi], dtype=buf.dtype, device=buf.device)
        a, b = (int(v) for v in torch.searchsorted(buf, edges, right=True))
        if b - a > self.cap:  # massive ties: cannot narrow; refine after this pass
            self._give_up()
            return
        self.n_le += a
        self.merged = buf[a:b].clone()
        self.lo, self.hi = new_lo, new_hi
        self.n_buf = self.merged.numel()

    def _give_up(self) -> None:
        self.failed = True
        self.merged, self.window, self.cur_pieces, self.n_buf = None, [], [], 0

    def finish(self) -> bool:
        if self.n_seen != self.total:
            raise RuntimeError(f"pass saw {self.n_seen} values, expected {self.total}")
        if self.failed:
            return False
        parts = self._buffer()
        n_band = sum(t.numel() for t in parts)
        ok = self.n_le <= self.k0 and self.k1 < self.n_le + n_band
        if ok:
            buf = torch.cat(parts)
            self.merged, self.window, self.cur_pieces, parts = None, [], [], None
            buf = _sort(buf, inplace=True)
            v0, v1 = float(buf[self.k0 - self.n_le]), float(buf[self.k1 - self.n_le])
            self.result = _lerp(v0, v1, self.gamma)
        self.merged, self.window, self.cur_pieces = None, [], []
        return ok


def _keys(block: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of float32 / float64 values (-0.0 sorts just below +0.0)."""
    if block.dtype == torch.float32:
        b = block.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    b = block.contiguous().view(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFFFFFFFFFF)


def _from_key(key: int, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        b = key if key >= 0 else key ^ 0x7FFFFFFF
        return float(torch.tensor([b], dtype=torch.int64).to(torch.int32).view(torch.float32))
    b = key if key >= 0 else key ^ 0x7FFFFFFFFFFFFFFF
    return float(torch.tensor([b], dtype=torch.int64).view(torch.float64))


class _RadixSelect:
    """The k-th smallest (0-based) of a streamed multiset, exactly, by radix selection on keys.

    Each pass either histograms the next 16 bits of the keys sharing the current prefix (exact integer
    bins, so the count below the chosen bin stays exact) or, once the prefix holds <= ``cap`` values,
    collects them and selects directly. float32 needs at most 2 histogram passes, float64 at most 4.
    Masked entries (-inf) are removed from the counts.
    """

    def __init__(self, k: int, total: int, cap: int, dtype: torch.dtype):
        self.k, self.cap, self.dtype = k, max(int(cap), 16), dtype
        self.bits = 32 if dtype == torch.float32 else 64
        self.shift = self.bits  # prefix = key >> shift; shift == bits: no prefix yet (all values)
        self.prefix = 0
        self.n_below = 0  # valid values with a smaller prefix
        self.count_in = total
        self.masked_key = int(_keys(torch.tensor([-math.inf], dtype=dtype))[0])
        self.result: float | None = None

    def _in_prefix(self, key: int) -> bool:
        return self.shift == self.bits or (key >> self.shift) == self.prefix

    def begin(self) -> None:
        self.collect = self.count_in <= self.cap
        self.next_shift = max(0, self.shift - 16)
        self.hist = torch.zeros(1 << (self.shift - self.next_shift), dtype=torch.int64)
        self.values: list[torch.Tensor] = []  # keys (collect) or digits waiting for one bincount
        self.n_values = 0
        self.masked = 0

    def _digits(self, keys: torch.Tensor) -> torch.Tensor:
        d = keys >> self.next_shift
        if self.shift == self.bits:
            return d + (1 << (self.bits - self.next_shift - 1))  # signed top digit -> 0..2^16-1
        return d & ((1 << (self.shift - self.next_shift)) - 1)

    def add(self, block: torch.Tensor, n_masked: int = 0) -> None:
        keys = _keys(block).view(-1)
        if self.shift != self.bits:
            keys = keys[(keys >> self.shift) == self.prefix]
        if self._in_prefix(self.masked_key):
            self.masked += n_masked
        self.values.append(keys if self.collect else self._digits(keys))
        self.n_values += keys.numel()
        if not self.collect and self.n_values >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self.values:
            digits = torch.cat(self.values)
            self.hist += torch.bincount(digits, minlength=self.hist.numel()).cpu()
        self.values, self.n_values = [], 0

    def finish(self) -> bool:
        if not self.collect:
            self._flush()
        if self.collect:
            keys = torch.cat(self.values)
            self.values = []
            keys = _sort(keys, inplace=True)[self.masked:]  # the -inf keys sort first
            self.result = _from_key(int(keys[self.k - self.n_below]), self.dtype)
            return True
        if self.masked:
            self.hist[int(self._digits(torch.tensor([self.masked_key])))] -= self.masked
        cum = self.n_below + torch.cumsum(self.hist, 0)
        b = int(torch.searchsorted(cum, torch.tensor([self.k]), right=True))
        self.n_below = int(cum[b - 1]) if b > 0 else self.n_below
        self.count_in = int(self.hist[b])
        if self.shift == self.bits:
            self.prefix = b - (1 << (self.bits - self.next_shift - 1))
        else:
            self.prefix = (self.prefix << (self.shift - self.next_shift)) + b
        self.shift = self.next_shift
        if self.shift == 0:  # one key: one value
            self.result = _from_key(self.prefix, self.dtype)
            return True
        return False


def _streamed_percentile(blocks, total: int, q: float, cap: int, dtype: torch.dtype,
                         device: torch.device, band: _BandSelect | None = None) -> float:
    """Exact np.percentile(., 100 q) of the multiset in ``blocks()`` (yields (block, n_masked)).

    ``band`` is a _BandSelect already fed one full pass (the caller's main pass); if it has no answer
    (or none is given) exact radix selection takes over with further passes.
    """
    if band is None:
        band = _BandSelect(total, q, cap, dtype, device)
        for block, n_masked in blocks():
            band.add(block, n_masked)
            band.end_block(1)
    if band.finish():
        return band.result
    k0, k1, gamma = _linear_index(total, q)
    sels = {k: _RadixSelect(k, total, cap, dtype) for k in sorted({k0, k1})}
    for _ in range(8):
        todo = [s for s in sels.values() if s.result is None]
        if not todo:
            break
        for s in todo:
            s.begin()
        for block, n_masked in blocks():
            for s in todo:
                s.add(block, n_masked)
        for s in todo:
            s.finish()
    return _lerp(sels[k0].result, sels[k1].result, gamma)


# --------------------------------------------------------------------------------------- main API
def _tiling(n: int, chunk_size: int | None) -> tuple[int, int]:
    """(rows, columns) of one tile of similarities: ~_CHUNK_ELEMENTS per tile, 1024 rows by default."""
    rows = min(n, _DEFAULT_ROWS) if chunk_size is None else min(n, int(chunk_size), _CHUNK_ELEMENTS)
    return rows, min(n, max(1, _CHUNK_ELEMENTS // rows))


def _self_exp_sum(u: torch.Tensor, rows: int, cols: int) -> float:
    """sum_{i != j} exp(-2 ||u_i - u_j||^2) = sum exp(4 cos - 4) for unit rows, from the upper triangle."""
    n = u.shape[0]
    total = 0.0
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        for c0 in range(lo, n, cols):
            e = torch.exp((u[lo:hi] @ u[c0:c0 + cols].T).mul_(4).sub_(4))
            if c0 < hi:  # the tile crosses the diagonal: keep column > row, i.e. j - i >= lo - c0 + 1
                e = torch.triu(e, diagonal=lo - c0 + 1)
            total += 2 * float(e.sum(dtype=torch.float64))
    return total


def _linear_separability(x: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, my: torch.Tensor,
                         max_iter: int = 300) -> float:
    """Best training accuracy of three linear classifiers (image: w.u + c > 0) on all 2N points.

    1. the centroid classifier w = mean x - mean y, c at the midpoint; 2. full-batch L-BFGS on the
    unregularised squared hinge loss (an L2-SVM; reaches zero loss, hence accuracy 1, on separable
    sets); 3. L-BFGS on the unregularised logistic loss. Stops early at accuracy 1.
    """
    with torch.inference_mode(False):  # callers (open_clip's evaluate) may run under inference_mode
        return _fit_separability(x.clone(), y.clone(), mx.clone(), my.clone(), max_iter)


def _fit_separability(x: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, my: torch.Tensor,
                      max_iter: int) -> float:
    n = x.shape[0]
    dtype = x.dtype

    def accuracy(w: torch.Tensor, c: torch.Tensor) -> float:
        if not (torch.isfinite(w).all() and torch.isfinite(c).all()):
            return 0.0
        correct = int(torch.count_nonzero(x @ w + c > 0)) + int(torch.count_nonzero(y @ w + c <= 0))
        return correct / (2 * n)

    w0 = mx - my
    nn2 = float(w0 @ w0)
    c0 = 0.0
    if nn2 > 0:
        w0 = w0 * (4.0 / nn2)  # class means at logits +-2
        c0 = -float(w0 @ (mx + my)) / 2
    w0 = w0.to(dtype)
    best = accuracy(w0, torch.tensor([c0], dtype=dtype, device=x.device))
    for loss_name, iters in (("squared_hinge", max_iter), ("logistic", max_iter // 3)):
        if best == 1.0:
            break
        w = w0.clone().requires_grad_(True)
        c = torch.tensor([c0], dtype=dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, c], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-10,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure(w=w, c=c, opt=opt, loss_name=loss_name):
            opt.zero_grad()
            fx, fy = x @ w + c, y @ w + c
            if loss_name == "logistic":
                loss = torch.nn.functional.softplus(-fx).mean() + torch.nn.functional.softplus(fy).mean()
            else:
                loss = (1 - fx).clamp(min=0).square().mean() + (1 + fy).clamp(min=0).square().mean()
            loss = loss / 2
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        best = max(best, accuracy(w.detach(), c.detach()))
    return best


@torch.no_grad()
def geometry_metrics(
    image_features: Any,
    text_features: Any,
    *,
    logit_scale: Any = None,
    logit_bias: Any = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Geometry metrics of N matched pairs (row i of each input is pair i); see the module table.

    Args:
        image_features, text_features: (N, d) torch tensors or numpy arrays, N >= 2; rows are
            L2-normalised here. Computed on the inputs' device.
        logit_scale: t, already exponentiated (optional; adds the model keys and ``sigmoid_loss``).
        logit_bias: open_clip's additive bias (optional, needs ``logit_scale``); b_rel = -logit_bias / t.
        chunk_size: rows per tile of similarities (default 1024; a tile holds ~4M similarities).

    Raises ValueError on NaN/Inf, non-2-D or mismatched inputs, N < 2, zero rows or bad scalars.
    """
    x, y = _prepare(image_features, text_features)
    n, d = x.shape
    dev, cdt = x.device, x.dtype
    f64 = torch.float64
    t_scale = None if logit_scale is None else _scalar(logit_scale, "logit_scale")
    if t_scale is not None and t_scale <= 0:
        raise ValueError(f"logit_scale is t = exp(log scale) and must be > 0, got {t_scale}")
    if logit_bias is not None and t_scale is None:
        raise ValueError("logit_bias was given without logit_scale (t is needed for b_rel = -logit_bias / t)")
    l_bias = 0.0 if logit_bias is None else _scalar(logit_bias, "logit_bias")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, cols = _tiling(n, chunk_size)

    # ---- O(N d) statistics, float64.
    sx = torch.zeros(d, dtype=f64, device=dev)
    sy = torch.zeros(d, dtype=f64, device=dev)
    sqx = sqy = l2i = align = 0.0
    pos = torch.empty(n, dtype=f64, device=dev)
    for lo, hi in _row_blocks(n, d):
        xb, yb = x[lo:hi].to(f64), y[lo:hi].to(f64)
        sx += xb.sum(0)
        sy += yb.sum(0)
        sqx += float((xb * xb).sum())
        sqy += float((yb * yb).sum())
        pos[lo:hi] = (xb * yb).sum(1)
        diff = xb - yb
        l2i += float(torch.linalg.vector_norm(diff, dim=1).sum())
        align += float((diff * diff).sum())
    zbar = (sx - sy) / n
    xi = 0.0
    for lo, hi in _row_blocks(n, d):
        z = x[lo:hi].to(f64) - y[lo:hi].to(f64) - zbar
        xi += float((z * z).sum())
    mx, my = sx / n, sy / n
    n_neg = n * (n - 1)
    pos_sum = float(pos.sum())
    pos_mean = pos_sum / n
    neg_mean = (float(sx @ sy) - pos_sum) / n_neg
    rel_bias_mean = (pos_mean + neg_mean) / 2
    rel_bias_model = None if t_scale is None else -l_bias / t_scale
    threshold = rel_bias_model if (t_scale is not None and logit_bias is not None) else rel_bias_mean

    # ---- one pass over X Y^T in tiles; rows (and, when tiled, columns) in a fixed random order, so
    # that the part seen is a random sample and the percentile band can narrow during the pass.
    pos_c = pos.to(cdt)
    thr_c = torch.tensor(threshold, dtype=cdt, device=dev)
    i2t = torch.zeros(n, dtype=torch.int64, device=dev)
    t2i = torch.zeros(n, dtype=torch.int64, device=dev)
    neg_viol = torch.zeros((), dtype=torch.int64, device=dev)
    neg_max = torch.tensor(-math.inf, dtype=cdt, device=dev)
    softplus_sum = torch.zeros((), dtype=f64, device=dev)
    gen = torch.Generator().manual_seed(0)
    perm_r = torch.randperm(n, generator=gen).to(dev)
    perm_c = torch.randperm(n, generator=gen).to(dev) if cols < n else torch.arange(n, device=dev)
    col_of = torch.empty_like(perm_c)
    col_of[perm_c] = torch.arange(n, device=dev)  # position of text j in the column order
    cap = max(1024, _SELECT_CAP_BYTES // (torch.finfo(cdt).bits // 8))
    band = _BandSelect(n_neg, 0.95, cap, cdt, dev)

    def tiles():
        """(rows idx, columns cidx, similarities with the matched pairs at -inf, #masked, last tile?)."""
        for lo in range(0, n, rows):
            idx = perm_r[lo:lo + rows]
            xr, diag = x[idx], col_of[idx]
            for c0 in range(0, n, cols):
                cidx = perm_c[c0:c0 + cols]
                s = xr @ (y if cols == n else y[cidx]).T
                hit = ((diag >= c0) & (diag < c0 + cols)).nonzero().squeeze(1)
                s[hit, diag[hit] - c0] = -math.inf
                yield idx, cidx, s, hit.numel(), c0 + cols >= n

    row_count = None
    ones = torch.ones(max(rows, cols), dtype=torch.float32, device=dev)
    for idx, cidx, s, n_masked, last in tiles():
        if row_count is None:
            row_count = torch.zeros(idx.numel(), dtype=torch.int64, device=dev)
        # Counting as 0/1 float32 matrix-vector products is exact (< 2^24) and ~2x faster than sum(bool).
        r, c = s.shape
        row_count += ((s > pos_c[idx, None]).to(torch.float32) @ ones[:c]).to(torch.int64)
        t2i[cidx] += (ones[:r] @ (s > pos_c[None, cidx]).to(torch.float32)).to(torch.int64)
        neg_viol += torch.count_nonzero(s > thr_c)
        neg_max = torch.maximum(neg_max, s.max())
        if t_scale is not None:
            z = s.mul(t_scale).sub_(t_scale * rel_bias_model)
            softplus_sum += torch.nn.functional.softplus(z).sum(dtype=f64)
        band.add(s, n_masked)
        if last:
            i2t[idx] = row_count
            row_count = None
            band.end_block(idx.numel())
    neg_p95 = _streamed_percentile(
        lambda: ((s, m) for _, _, s, m, _ in tiles()), n_neg, 0.95, cap, cdt, dev, band=band
    )
    pos_p5 = _percentile_dense(pos, 0.05)
    pos_min, neg_max_f = float(pos.min()), float(neg_max)

    # ---- X X^T and Y Y^T (upper triangles): uniformity; cones from the column sums.
    unif_x = math.log(_self_exp_sum(x, rows, cols) / n_neg)
    unif_y = math.log(_self_exp_sum(y, rows, cols) / n_neg)
    cone_x = (float(sx @ sx) - sqx) / n_neg
    cone_y = (float(sy @ sy) - sqy) / n_neg
    d_match = max(float(((1 - pos) / 2).mean()), 1e-3)
    d_img, d_txt = (1 - cone_x) / 2, (1 - cone_y) / 2
    gap = mx - my
    norm_mx, norm_my = float(torch.linalg.vector_norm(mx)), float(torch.linalg.vector_norm(my))
    centroid_cos = float(mx @ my) / (norm_mx * norm_my) if norm_mx > 0 and norm_my > 0 else 0.0

    out: dict[str, float] = {
        "n_pairs": n,
        "pos_sim_mean": pos_mean,
        "neg_sim_mean": neg_mean,
        "margin_worst": (pos_min - neg_max_f) / 2,
        "rel_bias_worst": (pos_min + neg_max_f) / 2,
        "margin_mean": (pos_mean - neg_mean) / 2,
        "rel_bias_mean": rel_bias_mean,
        "margin_trimmed": (pos_p5 - neg_p95) / 2,
        "rel_bias_trimmed": (pos_p5 + neg_p95) / 2,
        "violation_threshold": threshold,
        "pos_violations": int(torch.count_nonzero(pos < threshold)),
        "neg_violations": int(neg_viol),
        "linear_separability": _linear_separability(x, y, mx, my),
        "xi": xi / n,
        "gap_l2m": float(torch.linalg.vector_norm(gap)),
        "gap_centroid_cosine": 1 - centroid_cos,
        "gap_l2i": l2i / n,
        "rmg": d_match / (d_match + (d_img + d_txt) / 2),
        "cone_image": cone_x,
        "cone_text": cone_y,
        "uniformity_image": unif_x,
        "uniformity_text": unif_y,
        "alignment": align / n,
    }
    for name, cnt in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in _RECALL_KS:
            out[f"{name}_R@{k}"] = float(torch.count_nonzero(cnt < k)) / n
        c = cnt.to(f64)
        out[f"{name}_mean_rank"] = float(c.mean()) + 1
        out[f"{name}_median_rank"] = math.floor(float(np.median(c.cpu().numpy()))) + 1
    if t_scale is not None:
        zpos = (pos - rel_bias_model) * t_scale
        total = float(softplus_sum) + float(torch.nn.functional.softplus(zpos).sum()) - float(zpos.sum())
        out.update({
            "logit_scale": t_scale,
            "logit_bias": l_bias,
            "rel_bias_model": rel_bias_model,
            "sigmoid_loss": total / n,
        })
    return out
