"""Thm 3.4's feasible region of N pairs as an (m, b_rel)-constellation (exact), each inequality written once.

b_rel + m <= 1,  b_rel - m >= -1,  (3 - 4/N) m <= 1 + b_rel, so m <= N / (2 (N - 1)) for the best b_rel;
sizes exponential in d need 3 m < 1 + b_rel. ``validate`` raises on the first inequality that fails,
``feasible_region`` reports each of them.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from open_clip_sigrel.tools.bounds._shared import _TOL, MIN_MARGIN, RIGOROUS


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
    if 0 < float(margin) < MIN_MARGIN:
        raise ValueError(f"margin m = {float(margin):g} is below {MIN_MARGIN:g}, where c = 1 - 2m is within float64 "
                         f"rounding of 1 and no bound here is rigorous; give m = 0 (exact: any N fits) or m >= "
                         f"{MIN_MARGIN:g}")
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
