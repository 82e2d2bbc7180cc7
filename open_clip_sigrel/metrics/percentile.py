"""Exact numpy-'linear' percentiles, dense or of a multiset streamed in blocks (never held whole).

``percentile(values, q)`` equals ``np.percentile(values, 100 q)`` (numpy's default 'linear' method:
virtual index (M - 1) q, numpy's lerp between the two order statistics around it).

``streamed_percentile(blocks, total, q, cap, dtype, device)`` gives the same number for a multiset that
arrives in blocks (e.g. the N(N-1) unmatched similarities, tile by tile) keeping at most ``cap`` values:

* ``BandSelect`` (one pass, usually the caller's own): exact counts of values <= lo and the values in a
  band (lo, hi]. The band starts as everything and is narrowed while the pass runs (blocks should
  arrive in random order, so the part seen is a random sample; the margin is 6 standard errors of the
  observed block-to-block spread). At the end the exact counts verify that both order statistics lie
  in the band.
* ``RadixSelect`` (only if that verification fails, or the cap / massive ties forced it): exact radix
  selection on order-preserving integer keys of the floats, 16 bits per extra pass (histogram of the
  next key digit among values sharing the chosen prefix; collect and select once <= cap values
  remain): at most 2 extra passes for float32, 4 for float64, exact with ties.

>>> import numpy as np, torch
>>> v = torch.tensor([3.0, -1.0, 2.5, 0.0, 7.0], dtype=torch.float64)
>>> percentile(v, 0.95) == float(np.percentile(v.numpy(), 95))
True
>>> blocks = lambda: ((v[i:i + 2], 0) for i in range(0, 5, 2))
>>> streamed_percentile(blocks, 5, 0.95, 16, torch.float64, torch.device("cpu")) == percentile(v, 0.95)
True
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["percentile", "streamed_percentile", "BandSelect", "RadixSelect"]


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


def percentile(values: torch.Tensor, q: float) -> float:
    """np.percentile(values, 100 q) of a 1-D tensor (numpy's 'linear' method), as a Python float.

    P_q = v_(k0) + gamma (v_(k0 + 1) - v_(k0)),  k0 + gamma = (M - 1) q,  v_(k) the sorted values.
    """
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


class BandSelect:
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


class RadixSelect:
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


def streamed_percentile(blocks, total: int, q: float, cap: int, dtype: torch.dtype,
                        device: torch.device, band: BandSelect | None = None) -> float:
    """Exact np.percentile(., 100 q) of the ``total`` values streamed by ``blocks()``.

    ``blocks`` is a callable returning an iterable of (block, n_masked) (it is called once per extra
    pass); a block may hold n_masked -inf entries that are not part of the multiset. ``cap``: values kept
    at most; ``dtype``: float32 or float64, the blocks' dtype.

    ``band`` is a BandSelect already fed one full pass (the caller's main pass); if it has no answer
    (or none is given) exact radix selection takes over with further passes.
    """
    if band is None:
        band = BandSelect(total, q, cap, dtype, device)
        for block, n_masked in blocks():
            band.add(block, n_masked)
            band.end_block(1)
    if band.finish():
        return band.result
    k0, k1, gamma = _linear_index(total, q)
    sels = {k: RadixSelect(k, total, cap, dtype) for k in sorted({k0, k1})}
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
