"""How many matched pairs fit in d dimensions as an (m, b_rel)-constellation?

An (m, b_rel)-constellation of N pairs of unit vectors (U_i, V_i) has s_ii >= b_rel + m for every i and
s_ij <= b_rel - m for every i != j (Bangachev et al., arXiv 2509.18552). This module reports

* the feasible region (Thm 3.4, exact):  b_rel + m <= 1,  b_rel - m >= -1,  (3 - 4/N) m <= 1 + b_rel,
  so m <= N / (2 (N - 1)) for the best b_rel; sizes exponential in d need 3 m < 1 + b_rel;
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

Bounds on A(n, c) (every one rigorous up to float64 rounding, which is guarded by small safety factors):
  exact: c >= 1 (unbounded), c < 0 (min(n + 1, floor(1 - 1/c)): Rankin + simplex), c = 0 (2n, Rankin +
  cross-polytope), n = 1 (2), n = 2 (floor(2 pi / arccos c)), kissing numbers at c = 1/2 for n = 3, 4,
  8, 24 (12, 24, 240, 196560);
  upper: cap packing (caps of angular radius theta/2 are disjoint), the Delsarte linear-programming
  bound (``delsarte_lp_bound``: the LP is solved on a grid with scipy's HiGHS, then the polynomial it
  returns is certified non-positive on all of [-1, c] with a third-derivative bound between grid points
  and shifted by the certified maximum, so the number returned is a true bound for that polynomial);
  lower: greedy / Chabauty-Shannon-Wyner (A >= 1 / cap(theta)), random codes with a union bound,
  binary codes (Gilbert-Varshamov), explicit codes (simplex, cross-polytope, polygons, root systems
  A_n, D_n, E6, E7, E8, the Leech lattice's 196560 minimal vectors), each valid in every higher dim.
The Levenshtein bound is not implemented separately: it is the optimum of the same LP over a
restricted family of polynomials, so the LP bound (degree <= LP_DEGREE = 30 by default) is at least as good
whenever Levenshtein's polynomial has degree <= 30.

scipy (the 'research' extra) computes the caps, the Gilbert-Varshamov sums and the LP. Command line:
``open-clip-sigrel bounds --n N --margin M [--rel-bias B] [--dim D] [--json]`` (open_clip_sigrel.cli.bounds).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from open_clip_sigrel._optional import require

RIGOROUS = "rigorous"
ASYMPTOTIC = "asymptotic"
_TOL = 1e-12  # slack for comparisons of inner products (float64 inputs)
_LOG_HUGE = 690.0  # exp() of more overflows; bounds above this are reported as 1e300 / inf

#: the Delsarte LP's polynomial degree unless asked otherwise
LP_DEGREE = 30

# Explicit codes with max inner product 1/2 (kissing configurations): (dimension, size, name).
_HALF_CODES = (
    (6, 72, "E6 root system"),
    (7, 126, "E7 root system"),
    (8, 240, "E8 root system"),
    (24, 196560, "Leech lattice minimal vectors"),
)
# Proven kissing numbers (exact A(n, 1/2)).
_KISSING = {
    3: (12, "kissing number in R^3 (Schutte-van der Waerden 1953)"),
    4: (24, "kissing number in R^4 (Musin 2008)"),
    8: (240, "kissing number in R^8 (Levenshtein; Odlyzko-Sloane 1979)"),
    24: (196560, "kissing number in R^24 (Levenshtein; Odlyzko-Sloane 1979)"),
}


# ----------------------------------------------------------------------------------------------
# Input validation and the feasible region (Thm 3.4's inequalities, written once)
# ----------------------------------------------------------------------------------------------
class _Condition(NamedTuple):
    inequality: str
    value: float
    holds: bool
    failure: str  # the ValueError message when it does not hold


def max_pairs_any_dim(margin: float, rel_bias: float | None = None) -> float:
    """Thm 3.4 solved for N: N <= 4m / (3m - 1 - b_rel) when 3m > 1 + b_rel, else unbounded (inf).

    b_rel free (None): at the best b_rel = 1 - m this is N <= 2m / (2m - 1) when m > 1/2.
    """
    m = float(margin)
    if rel_bias is None:
        return 2 * m / (2 * m - 1) if m > 0.5 else math.inf
    b = float(rel_bias)
    return 4 * m / (3 * m - 1 - b) if m > 0 and 3 * m > 1 + b else math.inf


def _region(n: int, margin: float, rel_bias: float | None) -> list[_Condition]:
    """Thm 3.4's region for N pairs, one inequality each; b_rel free means b_rel = 1 - m (the best one)."""
    m = float(margin)
    b = (1.0 - m) if rel_bias is None else float(rel_bias)
    lhs = (3 - 4 / n) * m
    if rel_bias is None:
        m_max = n / (2.0 * (n - 1))
        thm_failure = (f"m <= N / (2 (N - 1)) fails (Thm 3.4 with the best b_rel = 1 - m): m = {m:g} > "
                       f"{m_max:.6g} for N = {n}; equivalently N <= 2m / (2m - 1) = "
                       f"{max_pairs_any_dim(m):.6g}")
    else:
        thm_failure = (f"(3 - 4/N) m <= 1 + b_rel fails (Thm 3.4): (3 - 4/{n}) * {m:g} = {lhs:.6g} > 1 + b_rel = "
                       f"{1 + b:.6g}" + (f"; at most N <= 4m / (3m - 1 - b_rel) = {max_pairs_any_dim(m, b):.6g} "
                                         "pairs fit" if 3 * m > 1 + b else ""))
    return [
        _Condition("m >= 0", m, m >= 0, f"m >= 0 fails: the margin m = {m:g} is negative"),
        _Condition("b_rel + m <= 1", b + m, b + m <= 1 + _TOL,
                   f"b_rel + m <= 1 fails (positives need s_ii >= b_rel + m but s_ii <= 1): b_rel + m = {b + m:g}"),
        _Condition("b_rel - m >= -1", b - m, b - m >= -1 - _TOL,
                   f"b_rel - m >= -1 fails (negatives need s_ij <= b_rel - m but s_ij >= -1): b_rel - m = {b - m:g}"),
        _Condition("(3 - 4/N) m <= 1 + b_rel", lhs - (1 + b), lhs <= (1 + b) * (1 + _TOL) + _TOL, thm_failure),
    ]


def validate(n: int, margin: float, rel_bias: float | None = None, dim: int | None = None) -> None:
    """Raise ValueError naming the first inequality that fails.

    Conditions: N >= 2 (an integer); m >= 0; -1 <= b_rel <= 1; positives need s_ii >= b_rel + m with
    s_ii <= 1, i.e. b_rel + m <= 1; negatives need s_ij <= b_rel - m with s_ij >= -1, i.e.
    b_rel - m >= -1; Thm 3.4: (3 - 4/N) m <= 1 + b_rel; without b_rel, m <= N / (2 (N - 1)); d >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"N >= 2 (an integer number of pairs) fails: N = {n!r}")
    for name, value in (("margin", margin), ("rel_bias", rel_bias)):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    positive, *region = _region(n, margin, rel_bias)
    if not positive.holds:
        raise ValueError(positive.failure)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
        raise ValueError(f"d >= 1 (an integer dimension) fails: d = {dim!r}")
    if rel_bias is not None and abs(float(rel_bias)) > 1:
        raise ValueError(f"-1 <= b_rel <= 1 fails: b_rel = {float(rel_bias):g}")
    failed = [c for c in region if not c.holds]
    if failed:
        # b_rel free (b_rel = 1 - m): Thm 3.4's inequality, listed last, implies the other two
        raise ValueError(failed[0 if rel_bias is not None else -1].failure)


def feasible_region(n: int, margin: float, rel_bias: float | None = None) -> dict[str, Any]:
    """Thm 3.4's region for N pairs (exact: inside it a constellation exists in d = N dims).

    Returns each inequality with its value and whether it holds, the largest feasible margin, and
    whether (m, b_rel) allows sizes exponential in d (3 m < 1 + b_rel; b_rel = 1 - m when not given).
    """
    m = float(margin)
    b = (1.0 - m) if rel_bias is None else float(rel_bias)
    conds = [{"inequality": c.inequality, "value": c.value, "holds": c.holds} for c in _region(n, m, rel_bias)]
    exponential = m >= 0 and b + m <= 1 + _TOL and 3 * m < 1 + b
    return {
        "label": RIGOROUS,
        "source": "Thm 3.4 (necessary) + simplex construction (sufficient in d = N)",
        "rel_bias": None if rel_bias is None else b,
        "conditions": conds,
        "feasible": all(c["holds"] for c in conds),
        "max_margin": n / (2.0 * (n - 1)) if rel_bias is None else min(1 - b, (1 + b) / (3 - 4 / n)),
        "max_n_any_dim": max_pairs_any_dim(m, rel_bias),
        "exponential_size_possible": bool(exponential),
        "exponential_condition": "3 m < 1 + b_rel (and b_rel + m <= 1); for b_rel free: m < 1/2",
    }


def _scipy(module: str):
    """scipy.<module>, or ImportError naming the 'research' extra."""
    return require(f"scipy.{module}", "research")


# ----------------------------------------------------------------------------------------------
# Spherical caps
# ----------------------------------------------------------------------------------------------
def _log_sphere_w(n: int) -> float:
    """log of W_n = int_0^pi sin^(n-2)(x) dx = sqrt(pi) Gamma((n-1)/2) / Gamma(n/2)."""
    gammaln = _scipy("special").gammaln
    return 0.5 * math.log(math.pi) + gammaln((n - 1) / 2) - gammaln(n / 2)


def log_cap_fraction(n: int, phi: float, side: str = "nearest") -> float:
    """log of the fraction of the sphere S^(n-1) covered by a cap of angular radius phi (n >= 2).

    Exact (regularised incomplete beta) when representable; when it underflows, a rigorous
    bracket from sin^(n-2) x cos x <= sin^(n-2) x <= sin^(n-2) x cos x / cos phi is used:
    side="upper" returns an upper bound of the log, "lower" a lower bound, "nearest" the lower.
    """
    betainc = _scipy("special").betainc
    if n < 2:
        raise ValueError("cap fractions need n >= 2")
    if phi <= 0:
        return -math.inf
    if phi >= math.pi:
        return 0.0
    if phi > math.pi / 2:
        return math.log1p(-math.exp(log_cap_fraction(n, math.pi - phi, "upper" if side == "lower" else "lower")))
    frac = 0.5 * float(betainc((n - 1) / 2, 0.5, math.sin(phi) ** 2))
    if frac > 1e-250:
        return math.log(frac)
    base = (n - 1) * math.log(math.sin(phi)) - math.log(n - 1) - _log_sphere_w(n)
    return base - math.log(math.cos(phi)) if side == "upper" else base


# ----------------------------------------------------------------------------------------------
# Gegenbauer polynomials and the Delsarte LP bound
# ----------------------------------------------------------------------------------------------
def gegenbauer(n: int, degree: int, t: np.ndarray) -> np.ndarray:
    """Gegenbauer polynomials of S^(n-1) normalised to G_k(1) = 1, k = 0..degree, at points t.

    Recurrence: (k + n - 2) G_{k+1} = (2k + n - 2) t G_k - k G_{k-1}; |G_k| <= 1 on [-1, 1] for n >= 2.
    Returns an array of shape (degree + 1, len(t)).
    """
    t = np.asarray(t, dtype=np.float64)
    out = np.empty((degree + 1, t.size))
    out[0] = 1.0
    if degree >= 1:
        out[1] = t
    for k in range(1, degree):
        out[k + 1] = ((2 * k + n - 2) * t * out[k] - k * out[k - 1]) / (k + n - 2)
    return out


def _dfac(n: int, k: int) -> float:
    """G_k^(n)'(1) = k (k + n - 2) / (n - 1); and G_k^(n)' = G_k^(n)'(1) G_{k-1}^(n+2)."""
    return k * (k + n - 2) / (n - 1) if k > 0 else 0.0


@functools.lru_cache(maxsize=4096)
def delsarte_lp_bound(
    n: int, c: float, degree: int = LP_DEGREE, grid: int = 600, rounds: int = 4, check_points: int = 4001
) -> float | None:
    """Certified Delsarte linear-programming upper bound on A(n, c), or None if none was certified.

    Any f(t) = 1 + sum_{k>=1} f_k G_k(t) with f_k >= 0 and f <= M < 1 on [-1, c] gives
    A(n, c) <= (f(1) - M) / (1 - M) (apply Delsarte's bound to f - M). The LP (minimise f(1)
    subject to f <= -1/2 at the points) is solved with scipy's HiGHS on ``grid`` points of [-1, c]
    (uniform + Chebyshev-clustered); the -1/2 leaves room for f to rise between points. Each solution
    is certified by ``_certify`` (a rigorous upper bound M of f on all of [-1, c]: second/third-derivative
    argument with adaptive subdivision, plus a float64 rounding margin); further rounds add points
    around the local maxima of f and re-solve (up to 2 * ``rounds`` while none is certified). The smallest certified value is returned: rigorous, and
    at least the true LP optimum for this degree (usually within 1e-4 of it).
    """
    linprog = _scipy("optimize").linprog
    if n < 2 or not (-1.0 < c < 1.0) or degree < 1:
        return None
    u = np.linspace(0.0, math.pi, grid // 2)
    ts = np.unique(np.concatenate([np.linspace(-1.0, c, grid - grid // 2), -1 + (c + 1) * (1 - np.cos(u)) / 2]))
    check = np.linspace(-1.0, c, check_points)
    step = check[1] - check[0]
    g_check = gegenbauer(n, degree, check)
    cluster = np.array([-1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0]) * step
    best: float | None = None
    for r in range(2 * rounds):
        if r >= rounds and best is not None:
            break  # extra rounds only while nothing is certified yet
        g = gegenbauer(n, degree, ts)
        res = linprog(np.ones(degree), A_ub=g[1:].T, b_ub=np.full(ts.size, -1.5), bounds=(0, None), method="highs")
        if res.status != 0 or res.x is None:
            break
        coef = np.concatenate([[1.0], np.maximum(res.x, 0.0)])
        lp_value = (float(np.sum(coef)) + 0.5) / 1.5  # the grid LP optimum (f <= 0 normalisation)
        cert = _certify(n, c, coef[: int(np.nonzero(coef)[0][-1]) + 1], check_points)
        if cert is not None and (best is None or cert < best):
            best = cert
        if best is not None and best - lp_value <= 1e-5 * lp_value:
            break
        f = coef @ g_check
        peak = (f[1:-1] >= f[:-2]) & (f[1:-1] >= f[2:]) & (f[1:-1] > -0.5 - 1e-6 * lp_value)
        new = []
        for i in np.nonzero(peak)[0] + 1:
            denom = f[i - 1] - 2 * f[i] + f[i + 1]
            shift = 0.5 * (f[i - 1] - f[i + 1]) / denom if denom < 0 else 0.0
            new.append(check[i] + float(np.clip(shift, -1.0, 1.0)) * step + cluster)
        if not new:
            break
        ts = np.unique(np.concatenate([ts, np.clip(np.concatenate(new), -1.0, c)]))
    return best


def _certify(n: int, c: float, coef: np.ndarray, check_points: int) -> float | None:
    """(f(1) - M) / (1 - M) with M a certified upper bound of f = sum coef_k G_k on [-1, c].

    On each interval [a, b] of a grid, f <= max(f(a), f(b)) + (b - a)^2/8 * sup(-f''), and
    sup(-f'') <= -(f''(a) + f''(b))/2 + (b - a)/2 * sup|f'''|; intervals whose bound is not yet tight
    are subdivided (64 pieces, up to 4 levels).
    """
    deg = coef.size - 1
    ks = np.arange(deg + 1)
    d1 = np.array([_dfac(n, k) for k in ks])
    d2 = np.array([_dfac(n + 2, k - 1) if k >= 1 else 0.0 for k in ks])
    d3 = np.array([_dfac(n + 4, k - 2) if k >= 2 else 0.0 for k in ks])
    c2 = coef * d1 * d2  # f'' = sum_k c2_k G_{k-2}^(n+4)
    l3 = float(np.sum(coef * d1 * d2 * d3))  # >= sup |f'''| on [-1, 1]
    scale = float(np.sum(np.abs(coef)))

    def interval_bounds(pts: np.ndarray) -> np.ndarray:
        """pts: (k, p) rows of sorted points; bound of f on each of the (k, p - 1) intervals."""
        flat = pts.reshape(-1)
        f = (coef @ gegenbauer(n, deg, flat)).reshape(pts.shape)
        f2 = (c2[2:] @ gegenbauer(n + 4, deg - 2, flat)).reshape(pts.shape) if deg >= 2 else np.zeros_like(pts)
        h = np.diff(pts, axis=1)
        curv = np.maximum(0.0, -(f2[:, :-1] + f2[:, 1:]) / 2 + l3 * h / 2) * (h * h / 8)
        return np.maximum(f[:, :-1], f[:, 1:]) + curv, np.maximum(f[:, :-1], f[:, 1:])

    pts = np.linspace(-1.0, c, check_points)[None, :]
    top = -math.inf  # certified so far: bounds of intervals that are not refined further
    seen = -math.inf  # largest value of f seen at a point (a lower estimate of the max)
    for level in range(5):
        ub, ends = interval_bounds(pts)
        seen = max(seen, float(np.max(ends)))
        refine = ub > seen + 1e-6  # M matters to ~1e-6 (the bound moves by about dM / (1 - M))
        if level == 4 or not refine.any():
            top = max(top, float(np.max(ub)))
            break
        top = max(top, float(np.max(ub[~refine], initial=-math.inf)))
        lo, hi = pts[:, :-1][refine], pts[:, 1:][refine]
        if lo.size > 8192:  # keep the work bounded: the loosest 8192 are refined, the rest count as is
            order = np.argsort(ub[refine])
            top = max(top, float(np.max(ub[refine][order[:-8192]])))
            lo, hi = lo[order[-8192:]], hi[order[-8192:]]
        pts = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, 65)[None, :]
    top += 1e-13 * scale * (deg + 1)  # float64 rounding of the recurrences and sums
    if not top < 1.0 - 1e-9:
        return None
    return (float(np.sum(coef)) - top) / (1.0 - top)


# ----------------------------------------------------------------------------------------------
# Bounds on A(n, c)
# ----------------------------------------------------------------------------------------------
def _as_count(log_value: float, lower: bool) -> float:
    """A count from its log: floor-safe for lower bounds (capped at 1e300), inf when too big for upper."""
    if log_value > _LOG_HUGE:
        return 1e300 if lower else math.inf
    return math.exp(log_value)


def _floor_up(x: float) -> float:
    """floor(x) for an upper bound, guarded against rounding down (x * (1 + 1e-9))."""
    if not math.isfinite(x) or x >= 1e15:
        return x
    return float(math.floor(x * (1 + 1e-9) + 1e-9))


def _ceil_lb(x: float) -> float:
    """A >= x implies A >= ceil(x); guarded against rounding up."""
    if not math.isfinite(x) or x >= 1e15:
        return x
    return float(math.ceil(x * (1 - 1e-9) - 1e-9))


def _explicit_lower(n: int, c: float) -> tuple[float, str]:
    """Largest explicit code in R^n' (n' <= n) with max inner product <= c."""
    best, src = 1.0, "single point"
    cands: list[tuple[float, str]] = []
    if c >= -1 - _TOL:
        cands.append((2.0, "antipodal pair (R^1)"))
    if c < 0:
        k = min(n + 1, math.floor(1 - 1 / c + 1e-9))
        cands.append((float(k), f"regular simplex of {k} points (R^{k - 1}, inner product -1/{k - 1})"))
    else:
        cands.append((float(n + 1), f"regular simplex (R^{n}, {n + 1} points)"))
        cands.append((2.0 * n, f"cross-polytope (R^{n}, 2n points, inner product 0)"))
        if n >= 2 and c < 1:
            k = math.floor(2 * math.pi / math.acos(min(1.0, c + _TOL)) + 1e-9)
            cands.append((float(k), f"regular {k}-gon (R^2)"))
    if c >= 0.5 - _TOL:
        cands.append((float(n * (n + 1)), f"A_{n} root system (R^{n}, n(n+1) points)"))
        if n >= 3:
            cands.append((2.0 * n * (n - 1), f"D_{n} root system (R^{n}, 2n(n-1) points)"))
        for dim, size, name in _HALF_CODES:
            if n >= dim:
                cands.append((float(size), f"{name} (R^{dim})"))
    for value, name in cands:
        if value > best:
            best, src = value, name
    return best, src


def _log_gv_binary(n: int, c: float) -> float | None:
    """log of the Gilbert-Varshamov size of a binary code {+-1/sqrt n}^n with inner products <= c."""
    special = _scipy("special")
    gammaln, logsumexp = special.gammaln, special.logsumexp
    if n > 100_000 or c >= 1:
        return None
    delta = math.ceil(n * (1 - c) / 2 - 1e-9)  # Hamming distance delta <=> inner product 1 - 2 delta / n
    if delta <= 1:
        return n * math.log(2)
    i = np.arange(delta)
    log_ball = float(logsumexp(gammaln(n + 1) - gammaln(i + 1) - gammaln(n - i + 1)))
    return n * math.log(2) - log_ball


def spherical_code_bounds(n: int, c: float, lp: bool = True, lp_degree: int = LP_DEGREE) -> dict[str, Any]:
    """Rigorous lower and upper bounds on A(n, c), the largest code in R^n with inner products <= c.

    Returns {"n", "c", "lower", "lower_source", "upper", "upper_source", "exact", "label", "lower_all",
    "upper_all"}; values are floats (integers where finite and < 1e15); "upper" may be inf.
    """
    if n < 1:
        raise ValueError(f"n >= 1 fails: n = {n}")
    if c < -1 - _TOL:
        raise ValueError(f"c >= -1 fails: c = {c}")
    out: dict[str, Any] = {"n": int(n), "c": float(c), "label": RIGOROUS}

    def exact(value: float, src: str) -> dict[str, Any]:
        out.update(lower=value, lower_source=src, upper=value, upper_source=src, exact=True,
                   lower_all={src: value}, upper_all={src: value})
        return out

    if c >= 1 - _TOL:
        out.update(lower=math.inf, lower_source="c >= 1: any number of equal points",
                   upper=math.inf, upper_source="c >= 1", exact=True, lower_all={}, upper_all={})
        return out
    if c < -_TOL:
        k = float(min(n + 1, math.floor(1 - 1 / c + 1e-9)))
        return exact(k, "c < 0: Rankin (A <= 1 - 1/c, and <= n + 1 vectors with negative inner products) "
                        "and the regular simplex")
    if abs(c) <= _TOL:
        return exact(2.0 * n, "c = 0: Rankin (A(n, 0) = 2n) and the cross-polytope")
    if n == 1:
        return exact(2.0, "n = 1: the two points +-1")
    if n == 2:
        k = float(math.floor(2 * math.pi / math.acos(c) + 1e-9))
        return exact(k, "n = 2: regular polygon, floor(2 pi / arccos c)")
    if abs(c - 0.5) <= _TOL and n in _KISSING:
        return exact(float(_KISSING[n][0]), _KISSING[n][1])

    theta = math.acos(c)
    lows: dict[str, float] = {}
    v, src = _explicit_lower(n, c)
    lows[f"explicit: {src}"] = v
    lows["greedy / Chabauty-Shannon-Wyner: 1 / cap(theta)"] = _ceil_lb(
        _as_count(-log_cap_fraction(n, theta, "upper"), lower=True))
    log_p = log_cap_fraction(n, theta, "upper")  # P(<x, y> > c) for independent uniform x, y
    # N (N - 1) / 2 * p < 1  <=>  N < (1 + sqrt(1 + 8 / p)) / 2
    log_root = 0.5 * (math.log(2) - log_p) if log_p < -30 else math.log((1 + math.sqrt(1 + 8 / math.exp(log_p))) / 2)
    lows["random code, union bound: N (N - 1) / 2 * cap(theta) < 1"] = _ceil_lb(
        max(1.0, _as_count(log_root, lower=True) - 1.0))
    gv = _log_gv_binary(n, c)
    if gv is not None:
        lows["binary code, Gilbert-Varshamov"] = _ceil_lb(_as_count(gv, lower=True))
    ups: dict[str, float] = {}
    ups["cap packing: 1 / cap(theta / 2)"] = _floor_up(_as_count(-log_cap_fraction(n, theta / 2, "lower"), lower=False))
    if lp:
        val = delsarte_lp_bound(int(n), float(c), lp_degree)
        if val is not None:
            ups[f"Delsarte LP (degree <= {lp_degree}, certified)"] = _floor_up(val)
    lo_src = max(lows, key=lambda k: lows[k])
    up_src = min(ups, key=lambda k: ups[k])
    out.update(lower=lows[lo_src], lower_source=lo_src, upper=ups[up_src], upper_source=up_src,
               exact=lows[lo_src] == ups[up_src], lower_all=lows, upper_all=ups)
    return out


@functools.lru_cache(maxsize=65536)
def _lower(n: int, c: float) -> tuple[float, str]:
    r = spherical_code_bounds(n, c, lp=False)
    return r["lower"], r["lower_source"]


@functools.lru_cache(maxsize=65536)
def _upper(n: int, c: float, lp: bool) -> tuple[float, str]:
    r = spherical_code_bounds(n, c, lp=lp)
    return r["upper"], r["upper_source"]


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
        lo, hi = 1, 2
        while self.lower(hi)[0] < self.n:
            lo, hi = hi, hi * 2
            if hi > 1 << 62:
                raise RuntimeError("no sufficient dimension found")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.lower(mid)[0] >= self.n:
                hi = mid
            else:
                lo = mid
        return hi, self.lower(hi)[1]

    def largest_excluded(self) -> tuple[int, str]:
        """Largest d found with upper(d) < N (0 if none): every d' <= d is then excluded too."""
        def excluded(d: int, lp: bool) -> bool:
            return self.upper(d, lp)[0] < self.n

        # Cheap bounds (monotone in d) first, then the LP bound refines by galloping + bisection.
        if not excluded(1, False):
            base = 0
        else:
            lo, hi = 1, 2
            while excluded(hi, False):
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if excluded(mid, False):
                    lo = mid
                else:
                    hi = mid
            base = lo
        best = base
        step = 1
        bad = None
        while True:
            d = best + step
            if excluded(d, True):
                best = d
                step *= 2
            else:
                bad = d
                break
            if step > 1 << 40:
                break
        if bad is not None:
            lo, hi = best, bad
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if excluded(mid, True):
                    lo = mid
                else:
                    hi = mid
            best = lo
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
