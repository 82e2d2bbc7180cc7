"""Bounds on A(n, c), the largest code in R^n with all inner products <= c.

Every one is rigorous up to float64 rounding, which is guarded by small safety factors:
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

scipy (the 'research' extra) computes the caps, the Gilbert-Varshamov sums and the LP.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from open_clip_sigrel.extras import require
from open_clip_sigrel.tools.bounds._shared import _TOL, RIGOROUS

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

