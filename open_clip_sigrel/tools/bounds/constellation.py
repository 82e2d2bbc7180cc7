"""From spherical codes to (m, b_rel)-constellations: rigorous finite-d bounds, the paper's asymptotic rates.

* the paper's asymptotic dimensions (Thm 3.5 necessary, Thm 3.3 sufficient), labelled "asymptotic":
  they drop o(d) terms and are not bounds for any particular d;
* rigorous finite-d bounds, labelled "rigorous", from spherical codes. With c = 1 - 2m and A(n, c)
  the largest code in R^n with all inner products <= c:
    - sufficient: a code with max inner product alpha* = (1 + b_rel - 3m) / (1 + b_rel + m) in
      R^(d-1) gives an (m, b_rel)-constellation in R^d (U_i = (sqrt(l) x_i, sqrt(1-l)),
      V_i = (sqrt(l) x_i, -sqrt(1-l)), l = (1 + b_rel + m) / 2; at b_rel = 1 - m, l = 1 and U = V = code
      in R^d). Without b_rel: N pairs fit in d dims if A(d, c) >= N.
    - necessary: (U_i, V_i) / sqrt(2) is a code in R^(2d) with max inner product c, so N <= A(2d, c)
      (the b_rel-free sandwich). Derived here as well: P_i = U_i + V_i has |P_i|^2 in [2 + 2(b_rel + m), 4]
      and |P_i - P_j|^2 >= 16 m, so P_i / |P_i| is a code in R^d with max inner product c_b (see
      ``_p_code_inner_product``), giving N <= A(d, c_b); with b_rel free it is maximised over the
      feasible b_rel. c_b = c = 1 - 2m whenever 2 + 2 (b_rel + m) >= 4 (1 - 4m)^2; b_rel-free this holds
      for m >= ~1/8 (exactly sqrt(8m (1 - 1/N)) >= 2 - 8m), and then the sandwich closes: N pairs fit
      in R^d iff A(d, 1 - 2m) >= N.

Thm 3.4's region (``region``) caps N in every dimension; A(n, c) is bounded by ``spherical_codes``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from open_clip_sigrel.tools.bounds._shared import _TOL, ASYMPTOTIC, RIGOROUS
from open_clip_sigrel.tools.bounds.region import feasible_region, max_pairs_any_dim, validate
from open_clip_sigrel.tools.bounds.spherical_codes import _floor_up, spherical_code_bounds


# ----------------------------------------------------------------------------------------------
# From codes to constellations
# ----------------------------------------------------------------------------------------------
def code_inner_product(margin: float, rel_bias: float) -> float:
    """alpha* = (1 + b_rel - 3m) / (1 + b_rel + m): a code with this max inner product in R^(d-1)
    yields an (m, b_rel)-constellation in R^d (the largest alpha for which the construction works)."""
    m, b = float(margin), float(rel_bias)
    if 1 + b + m <= 0:
        return 1.0
    return (1 + b - 3 * m) / (1 + b + m)


def constellation_from_code(code: np.ndarray, margin: float, rel_bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Build (U, V) in R^(n+1) from a unit code x_i in R^n with max inner product <= alpha*.

    U_i = (sqrt(l) x_i, sqrt(1 - l)), V_i = (sqrt(l) x_i, -sqrt(1 - l)) with l = (1 + b_rel + m) / 2:
    s_ii = 2l - 1 = b_rel + m and s_ij = l <x_i, x_j> - (1 - l) <= b_rel - m.
    """
    x = np.asarray(code, dtype=np.float64)
    lam = (1 + float(rel_bias) + float(margin)) / 2
    a, e = math.sqrt(max(lam, 0.0)), math.sqrt(max(1 - lam, 0.0))
    extra = np.full((x.shape[0], 1), e)
    return np.hstack([a * x, extra]), np.hstack([a * x, -extra])


def _p_code_inner_product(margin: float, rel_bias: float) -> float:
    """Max inner product c_b of the normalised P_i = U_i + V_i of an (m, b_rel)-constellation.

    |P_i|^2 = 2 + 2 s_ii lies in [r0^2, 4] with r0^2 = 2 + 2 (b_rel + m); |P_i - P_j|^2 >= 16 m
    (from <U_i - U_j, V_i - V_j> >= 4m). For norms r, r' the cosine is at most (r^2 + r'^2 - 16m)/(2 r r'),
    which is convex in each norm, so its maximum over [r0, 2]^2 is at a corner:
    max(1 - 2m, 1 - 8m / r0^2, (r0^2 + 4 - 16m) / (4 r0)). Returns 1.0 when the bound is vacuous.
    """
    m, b = float(margin), float(rel_bias)
    r0sq = 2 + 2 * (b + m)
    if r0sq <= 1e-12:
        return 1.0
    r0 = math.sqrt(r0sq)
    cb = max(1 - 2 * m, 1 - 8 * m / r0sq, (r0sq + 4 - 16 * m) / (4 * r0))
    return min(cb, 1.0)


def _p_code_inner_product_free(n: int, margin: float) -> float:
    """max over feasible b_rel of c_b (b_rel in [max(m - 1, (3 - 4/N) m - 1), 1 - m])."""
    m = float(margin)
    b_min = max(m - 1, (3 - 4 / n) * m - 1)
    b_max = 1 - m
    if b_min > b_max:
        b_min = b_max
    return max(_p_code_inner_product(m, b_min), _p_code_inner_product(m, b_max))


# ----------------------------------------------------------------------------------------------
# Dimension search
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=65536)
def _lower(n: int, c: float) -> tuple[float, str]:
    r = spherical_code_bounds(n, c, lp=False)
    return r["lower"], r["lower_source"]


@functools.lru_cache(maxsize=65536)
def _upper(n: int, c: float, lp: bool) -> tuple[float, str]:
    r = spherical_code_bounds(n, c, lp=lp)
    return r["upper"], r["upper_source"]


def _gallop(pred, start: int, max_step: int) -> tuple[int, int | None]:
    """(largest d found with pred(d), the first d found without) for pred true up to some d and false after,
    pred(start) taken as true: probes start + 1, + 2, + 4, ... from the last true point, then bisects
    between it and the first false one. (best, None) if pred still held once the step passed max_step."""
    best, step = start, 1
    while pred(best + step):
        best, step = best + step, step * 2
        if step > max_step:
            return best, None
    lo, hi = best, best + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


class _Problem:
    """Rigorous lower/upper bounds on the number of pairs that fit in d dims, for a fixed (m, b_rel)."""

    def __init__(self, n: int, margin: float, rel_bias: float | None):
        self.n, self.m, self.b = n, float(margin), rel_bias
        self.c = 1 - 2 * self.m
        if rel_bias is None:
            self.alpha, self.extra = self.c, 0  # b_rel = 1 - m: U = V = code
            self.cb = _p_code_inner_product_free(n, self.m)
            self.cap = max_pairs_any_dim(self.m)
            self.trivial_all = self.m == 0  # c = 1: N copies of one point
        else:
            b = float(rel_bias)
            lam = (1 + b + self.m) / 2
            self.alpha = code_inner_product(self.m, b)
            self.extra = 0 if lam >= 1 - 1e-15 else 1
            self.cb = _p_code_inner_product(self.m, b)
            self.cap = max_pairs_any_dim(self.m, b)
            self.trivial_all = lam <= 1e-15  # b_rel = -1, m = 0: all U = e, all V = -e
            if self.alpha >= 1 - _TOL and not self.trivial_all:
                self.alpha = 1.0  # m = 0: one point repeated, plus the extra coordinate

    def lower(self, d: int) -> tuple[float, str]:
        """A rigorous lower bound on the number of pairs that fit in R^d, and how."""
        if self.trivial_all:
            return math.inf, "b_rel = -1, m = 0: U_i = e, V_i = -e"
        k = d - self.extra
        if k < 1:
            return 1.0, "one pair"
        val, src = _lower(k, self.alpha)
        where = (f"a code in R^{k} with max inner product {self.alpha:.6g} (alpha* = (1 + b_rel - 3m)/(1 + b_rel + m))"
                 f" plus one coordinate" if self.extra else f"a code in R^{k} with max inner product c = 1 - 2m, U = V")
        return val, f"{where}: {src}"

    def upper(self, d: int, lp: bool = True) -> tuple[float, str]:
        """A rigorous upper bound on the number of pairs that fit in R^d, and why."""
        if self.trivial_all:
            return math.inf, "unbounded"
        best, src = math.inf, "none"
        v, s = _upper(2 * d, self.c, lp)
        if v < best:
            best, src = v, f"(U_i, V_i)/sqrt 2 is a code in R^{2 * d} with max inner product c = 1 - 2m: {s}"
        if self.cb < 1 - _TOL:
            v, s = _upper(d, round(self.cb, 15), lp)
            if v < best:
                best, src = v, (f"(U_i + V_i)/|U_i + V_i| is a code in R^{d} with max inner product "
                                f"{self.cb:.6g}: {s}")
        if self.cap < best:
            best, src = _floor_up(self.cap), "Thm 3.4: N <= 4m / (3m - 1 - b_rel)"
        return best, src

    def smallest_sufficient(self) -> tuple[int, str]:
        """Smallest d found with lower(d) >= N (lower is monotone in d: bisection is exact)."""
        if self.lower(1)[0] >= self.n:
            return 1, self.lower(1)[1]
        _, hi = _gallop(lambda d: self.lower(d)[0] < self.n, 1, max_step=1 << 61)
        if hi is None:
            raise RuntimeError("no sufficient dimension found")
        return hi, self.lower(hi)[1]

    def largest_excluded(self) -> tuple[int, str]:
        """Largest d found with upper(d) < N (0 if none): every d' <= d is then excluded too."""
        def excluded(d: int, lp: bool) -> bool:
            return self.upper(d, lp)[0] < self.n

        # Cheap bounds (monotone in d) first, then the LP bound refines from there.
        base = _gallop(lambda d: excluded(d, False), 1, max_step=1 << 62)[0] if excluded(1, False) else 0
        best, _ = _gallop(lambda d: excluded(d, True), base, max_step=1 << 40)
        why = self.upper(best, True)[1] if best >= 1 else "no dimension excluded"
        return best, why


# ----------------------------------------------------------------------------------------------
# Asymptotic (paper) formulas
# ----------------------------------------------------------------------------------------------
def asymptotic_rates(margin: float, rel_bias: float) -> dict[str, float | None]:
    """Thm 3.5 necessary rate (nats per dim) and Thm 3.3 sufficient rate (bits per dim of a code in R^(d-2))."""
    m, b = float(margin), float(rel_bias)
    nec = 0.5 * math.log((1 + b + m) / (4 * m)) if m > 0 and 1 + b + m > 0 else None
    alpha = code_inner_product(m, b) if m > 0 else None
    suff = -0.5 * math.log2(1 - alpha * alpha) if alpha is not None and 0 < alpha < 1 else None
    return {"necessary_nats_per_dim": nec, "alpha": alpha, "sufficient_bits_per_dim": suff}


def _asymptotic(n: int, m: float, rel_bias: float | None, dim: int | None) -> dict[str, Any]:
    b = (1 - m) if rel_bias is None else float(rel_bias)
    rates = asymptotic_rates(m, b)
    out: dict[str, Any] = {
        "label": ASYMPTOTIC,
        "note": "o(d) terms dropped (Thm 3.5 / Thm 3.3); these are not bounds for a given d",
        "rel_bias_used": b,
        **rates,
    }
    if m == 0:
        out["note"] = "m = 0: any number of pairs fits in d <= 2 (all U equal, all V equal)"
    nec, suff = rates["necessary_nats_per_dim"], rates["sufficient_bits_per_dim"]
    if nec is not None and nec <= 0:
        nec = None
        out["note"] = "3m >= 1 + b_rel: the size is bounded (Thm 3.4), no exponential growth in d"
    out["necessary_dim"] = (math.log(n) / nec) if nec else None
    out["sufficient_dim"] = (2 + math.log2(n) / suff) if suff else None
    if dim is not None:
        out["log10_max_n_necessary"] = dim * nec / math.log(10) if nec else None
        out["log10_n_sufficient"] = (dim - 2) * suff * math.log10(2) if suff and dim > 2 else None
    return out


# ----------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------
def constellation_bounds(
    n: int, margin: float, rel_bias: float | None = None, dim: int | None = None
) -> dict[str, Any]:
    """Everything known about fitting N pairs as an (m, b_rel)-constellation.

    Args:
        n: number of pairs N >= 2.
        margin: the halved margin m >= 0.
        rel_bias: b_rel; None means "for the best b_rel" (the b_rel-free sandwich).
        dim: if given, also bound the largest N that fits in this many dimensions.

    Returns a dict with "input", "feasible_region" (rigorous, Thm 3.4), "asymptotic" (Thm 3.5 and
    Thm 3.3, labelled asymptotic) and "rigorous" ({"dim_min": {"lower", "upper", ...}} and, with dim,
    {"max_n": {"lower", "upper", ...}}). Raises ValueError naming the failing inequality.
    """
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    validate(n, margin, rel_bias, dim)
    m = float(margin)
    prob = _Problem(int(n), m, rel_bias)
    upper_d, why_up = prob.smallest_sufficient()
    excl, why_lo = prob.largest_excluded()
    result: dict[str, Any] = {
        "input": {"n": int(n), "margin": m, "rel_bias": None if rel_bias is None else float(rel_bias), "dim": dim},
        "c": prob.c,
        "feasible_region": feasible_region(int(n), m, rel_bias),
        "asymptotic": _asymptotic(int(n), m, rel_bias, dim),
        "rigorous": {
            "label": RIGOROUS,
            "scope": ("b_rel-free: for the best b_rel (sufficient at b_rel = 1 - m)" if rel_bias is None
                      else "at this b_rel"),
            "dim_min": {
                "label": RIGOROUS,
                "lower": excl + 1,
                "upper": upper_d,
                "lower_reason": (f"d = {excl} (and every smaller d) is excluded: {why_lo}" if excl >= 1
                                 else "d >= 1"),
                "upper_reason": f"N pairs fit in d = {upper_d}: {why_up}",
            },
        },
    }
    if dim is not None:
        lo, lo_src = prob.lower(dim)
        up, up_src = prob.upper(dim)
        result["rigorous"]["max_n"] = {
            "label": RIGOROUS, "dim": dim, "lower": lo, "upper": up,
            "lower_reason": lo_src, "upper_reason": up_src,
        }
    return result
