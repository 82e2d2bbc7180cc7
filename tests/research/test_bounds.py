"""Dimension / size bounds for (m, b_rel)-constellations (open_clip_sigrel.tools.bounds)."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from open_clip_sigrel.cli import main as cli_main
from open_clip_sigrel.tools import bounds as B
from open_clip_sigrel.tools.bounds.constellation import _p_code_inner_product, _p_code_inner_product_free


def _dmin(n: int, m: float, b: float | None = None) -> tuple[int, int]:
    r = B.constellation_bounds(n, m, b)["rigorous"]["dim_min"]
    return r["lower"], r["upper"]


# ---------------------------------------------------------------- spherical codes: known values
def test_rankin_simplex_regime_is_exact() -> None:
    for n in (2, 3, 5, 9):
        for c in (-0.9, -0.5, -0.25, -0.1, -0.01):
            r = B.spherical_code_bounds(n, c)
            assert r["lower"] == r["upper"] == min(n + 1, math.floor(1 - 1 / c + 1e-9))
            assert r["label"] == "rigorous"


def test_simplex_constellations_for_margin_above_half() -> None:
    # m > 1/2: at most 2m / (2m - 1) pairs (c = 1 - 2m < 0, Rankin); they need exactly N - 1 dims
    m = 0.55
    n_max = math.floor(2 * m / (2 * m - 1) + 1e-9)
    assert n_max == 11
    assert B.constellation_bounds(n_max, m)["feasible_region"]["feasible"]
    with pytest.raises(ValueError, match=r"m <= N / \(2 \(N - 1\)\)"):
        B.constellation_bounds(n_max + 1, m)
    assert _dmin(10, m) == (9, 9)
    assert B.constellation_bounds(10, m, dim=9)["rigorous"]["max_n"]["lower"] >= 10


def test_cross_polytope_at_half_margin() -> None:
    for n in (1, 3, 10, 50):
        r = B.spherical_code_bounds(n, 0.0)
        assert r["lower"] == r["upper"] == 2 * n
    # m = 1/2 (c = 0): 2d pairs fit in d dims and no more
    assert _dmin(20, 0.5) == (10, 10)
    mx = B.constellation_bounds(20, 0.5, dim=10)["rigorous"]["max_n"]
    assert mx["lower"] == mx["upper"] == 20


def test_e8_and_leech() -> None:
    r = B.spherical_code_bounds(8, 0.5)
    assert r["lower"] >= 240 and r["upper"] >= 240
    lp = B.delsarte_lp_bound(8, 0.5)
    assert lp is not None and 240 - 1e-9 <= lp < 240.01  # the LP bound is exactly 240 in R^8
    lp24 = B.delsarte_lp_bound(24, 0.5)
    assert lp24 is not None and 196560 - 1e-6 <= lp24 < 196560 * (1 + 1e-3)
    assert B.spherical_code_bounds(24, 0.5)["lower"] == 196560
    # 240 pairs at m = 1/4 fit in R^8 (U = V = E8) and no more
    mx = B.constellation_bounds(240, 0.25, dim=8)["rigorous"]["max_n"]
    assert mx["lower"] == mx["upper"] == 240
    assert _dmin(240, 0.25) == (8, 8)


def test_lp_kissing_bounds_match_literature() -> None:
    # Delsarte LP bounds on kissing numbers (Odlyzko-Sloane 1979): 13.158 (R^3), 25.558 (R^4), 46 (R^5)
    assert 13.158 < B.delsarte_lp_bound(3, 0.5) < 13.16
    assert 25.558 < B.delsarte_lp_bound(4, 0.5) < 25.56
    assert B.spherical_code_bounds(5, 0.5)["upper"] == 46
    assert B.spherical_code_bounds(5, 0.5)["lower"] == 40  # D5


def test_code_bounds_are_consistent() -> None:
    for n in (3, 6, 11, 20, 40):
        for c in (0.05, 0.3, 0.6, 0.85):
            r = B.spherical_code_bounds(n, c)
            assert 1 <= r["lower"] <= r["upper"], (n, c, r)


# ---------------------------------------------------------------- constructions and derivations
def test_constellation_from_code() -> None:
    code = np.vstack([np.eye(5), -np.eye(5)])  # cross-polytope: inner products 0 and -1
    for m, b in ((0.2, 0.3), (0.1, -0.4), (0.3, 0.7), (0.25, 0.0)):
        assert B.code_inner_product(m, b) >= 0
        u, v = B.constellation_from_code(code, m, b)
        assert u.shape == (10, 6)
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0)
        s = u @ v.T
        assert np.diag(s).min() >= b + m - 1e-12
        assert s[~np.eye(10, dtype=bool)].max() <= b - m + 1e-12


def test_necessary_codes_hold_on_random_constellations() -> None:
    """(U_i, V_i)/sqrt 2 has inner products <= 1 - 2m; (U_i + V_i) normalised has <= c_b."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        n, d = rng.integers(3, 12), rng.integers(3, 12)
        u = rng.normal(size=(n, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        v = u * rng.uniform(0.2, 3.0) + rng.normal(size=(n, d)) * rng.uniform(0.0, 1.0)
        if trial % 3 == 0:
            v = -v + 2 * rng.normal(size=(1, d))  # shifted / flipped texts: small or negative b_rel
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        s = u @ v.T
        off = ~np.eye(n, dtype=bool)
        m, b = (s.diagonal().min() - s[off].max()) / 2, (s.diagonal().min() + s[off].max()) / 2
        if m <= 0:
            continue
        checked += 1
        w = np.hstack([u, v]) / math.sqrt(2)
        assert (w @ w.T)[off].max() <= 1 - 2 * m + 1e-9
        p = u + v
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        assert (p @ p.T)[off].max() <= _p_code_inner_product(m, b) + 1e-9
        assert (p @ p.T)[off].max() <= _p_code_inner_product_free(n, m) + 1e-9
    assert checked > 50


# ---------------------------------------------------------------- Thm 3.4 region and the dimension bounds
def test_feasible_region_thm_3_4() -> None:
    n, b = 10, 0.0
    m_edge = (1 + b) / (3 - 4 / n)
    fr = B.feasible_region(n, m_edge - 1e-6, b)
    assert fr["feasible"] and not fr["exponential_size_possible"]  # 3m > 1 + b: bounded size
    assert fr["max_n_any_dim"] >= n
    with pytest.raises(ValueError, match=r"\(3 - 4/N\) m <= 1 \+ b_rel"):
        B.constellation_bounds(n, m_edge + 1e-3, b)
    # exact region: at its edge the simplex construction fits N pairs in at most N dims
    assert _dmin(n, m_edge - 1e-9, b)[1] <= n
    assert B.feasible_region(1000, 0.3, 0.0)["exponential_size_possible"]
    assert not B.feasible_region(1000, 0.34, 0.0)["exponential_size_possible"]
    assert B.feasible_region(1000, 0.49, None)["exponential_size_possible"]
    assert not B.feasible_region(3, 0.6, None)["exponential_size_possible"]
    assert B.feasible_region(7, 0.5, None)["max_margin"] == pytest.approx(7 / 12)


def test_monotone_in_n_and_margin() -> None:
    ns = (10, 100, 1000, 10_000)
    ms = (0.1, 0.2, 0.3, 0.4)
    table = {(n, m): _dmin(n, m) for n in ns for m in ms}
    for m in ms:
        for a, c in zip(ns, ns[1:]):
            assert table[(a, m)][0] <= table[(c, m)][0] and table[(a, m)][1] <= table[(c, m)][1]
    for n in ns:
        for a, c in zip(ms, ms[1:]):
            assert table[(n, a)][0] <= table[(n, c)][0] and table[(n, a)][1] <= table[(n, c)][1]


def test_necessary_below_sufficient_on_a_grid() -> None:
    for n in (5, 50, 10**4, 10**9):
        for m in (0.05, 0.15, 0.3, 0.45):
            for b in (None, -0.3, 0.0, 0.4):
                if b is not None and ((3 - 4 / n) * m > 1 + b or b + m > 1 or b - m < -1):
                    continue
                res = B.constellation_bounds(n, m, b)
                lo, up = res["rigorous"]["dim_min"]["lower"], res["rigorous"]["dim_min"]["upper"]
                assert 1 <= lo <= up, (n, m, b, lo, up)
                asy = res["asymptotic"]
                assert asy["label"] == "asymptotic"
                if asy["necessary_dim"] is not None and asy["sufficient_dim"] is not None:
                    assert asy["necessary_dim"] <= asy["sufficient_dim"]
                if b is not None:  # a fixed b_rel can only need more dimensions than the best one
                    lo_free, up_free = _dmin(n, m)
                    assert up_free <= up and lo_free <= up


def test_paper_example_asymptotic() -> None:
    # paper: N = 1e10, m = 0.1, b_rel = 0 gives d >~ 46
    res = B.constellation_bounds(10**10, 0.1, 0.0)
    assert res["asymptotic"]["necessary_dim"] == pytest.approx(45.5, abs=0.5)
    lo, up = res["rigorous"]["dim_min"]["lower"], res["rigorous"]["dim_min"]["upper"]
    assert lo <= up


def test_dim_gives_max_n_bounds() -> None:
    res = B.constellation_bounds(100, 0.2, 0.5, dim=12)
    mx = res["rigorous"]["max_n"]
    assert mx["label"] == "rigorous" and 1 <= mx["lower"] <= mx["upper"]
    assert res["asymptotic"]["log10_max_n_necessary"] > 0


def test_margin_zero_is_trivial() -> None:
    assert _dmin(10**6, 0.0) == (1, 1)
    assert _dmin(10**6, 0.0, -1.0) == (1, 1)
    lo, up = _dmin(10**6, 0.0, 0.3)
    assert lo == 1 and up <= 2


# ---------------------------------------------------------------- errors and CLI
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=1, margin=0.1), r"N >= 2"),
        (dict(n=10, margin=-0.1), r"m >= 0"),
        (dict(n=10, margin=0.1, rel_bias=1.5), r"-1 <= b_rel <= 1"),
        (dict(n=10, margin=0.2, rel_bias=0.9), r"b_rel \+ m <= 1"),
        (dict(n=10, margin=0.2, rel_bias=-0.9), r"b_rel - m >= -1"),
        (dict(n=10, margin=0.39, rel_bias=0.0), r"\(3 - 4/N\) m <= 1 \+ b_rel"),
        (dict(n=10, margin=0.6), r"m <= N / \(2 \(N - 1\)\)"),
        (dict(n=10, margin=0.1, dim=0), r"d >= 1"),
        (dict(n=10, margin=float("nan")), r"finite"),
    ],
)
def test_invalid_inputs_name_the_inequality(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        B.constellation_bounds(**kwargs)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["bounds", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_json_and_table() -> None:
    rc, out, _ = _cli("--n", "1e4", "--margin", "0.25", "--dim", "8", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["input"]["n"] == 10_000
    assert doc["rigorous"]["label"] == "rigorous" and doc["asymptotic"]["label"] == "asymptotic"
    assert doc["rigorous"]["max_n"]["upper"] >= doc["rigorous"]["max_n"]["lower"] >= 240
    rc, out, _ = _cli("--n", "1000", "--margin", "0.2", "--rel-bias", "0.3")
    assert rc == 0
    assert "[rigorous]" in out and "[asymptotic]" in out and "d_min in [" in out


def test_cli_errors() -> None:
    rc, out, err = _cli("--n", "10", "--margin", "0.2", "--rel-bias", "0.9")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "b_rel + m <= 1" in err
    rc, _, err = _cli("--n", "1", "--margin", "0.2", "--json")
    assert rc == 2 and "N >= 2" in err


def test_sandwich_closes_for_margins_above_one_eighth() -> None:
    # b_rel free and sqrt(8m (1 - 1/N)) >= 2 - 8m: N pairs fit in R^d iff A(d, 1 - 2m) >= N
    for n in (10, 1000):
        for m in (0.13, 0.2, 0.3, 0.45):
            assert _p_code_inner_product_free(n, m) == pytest.approx(1 - 2 * m, abs=1e-12)
        assert _p_code_inner_product_free(n, 0.1) > 0.8


# ---------------------------------------------------------------- one definition of Thm 3.4's region
def _thm_3_4(n: int, m: float, b: float | None) -> bool:
    """The region written out: b_rel free means some b_rel in [-1, 1] satisfies all four."""
    if b is None:
        return 0 <= m <= n / (2 * (n - 1))
    return m >= 0 and b + m <= 1 and b - m >= -1 and (3 - 4 / n) * m <= 1 + b


def test_validate_and_feasible_region_are_the_same_region() -> None:
    rng = np.random.default_rng(1)
    seen = {True: 0, False: 0}
    for _ in range(600):
        n = int(rng.choice([2, 3, 5, 10, 100, 10**6]))
        m = float(rng.uniform(0.0, 0.8))
        b = None if rng.random() < 0.3 else float(rng.uniform(-1.0, 1.0))
        inside = _thm_3_4(n, m, b)
        assert B.feasible_region(n, m, b)["feasible"] == inside, (n, m, b)
        if inside:
            B.validate(n, m, b)
        else:
            with pytest.raises(ValueError, match="fails"):
                B.validate(n, m, b)
        if b is not None and not inside:  # the error names the first inequality the region reports failing
            first = next(c for c in B.feasible_region(n, m, b)["conditions"] if not c["holds"])
            with pytest.raises(ValueError) as info:
                B.validate(n, m, b)
            assert str(info.value).startswith(first["inequality"] + " fails")
        seen[inside] += 1
    assert min(seen.values()) > 100


def test_max_pairs_is_thm_3_4_solved_for_n() -> None:
    for m, b in ((0.4, 0.0), (0.3, -0.2), (0.6, 0.3), (0.55, None), (0.7, None)):
        n_max = B.max_pairs_any_dim(m, b)
        assert n_max == pytest.approx(4 * m / (3 * m - 1 - (1 - m if b is None else b)), rel=1e-12)
        largest = math.floor(n_max + 1e-9)
        assert largest >= 2 and _thm_3_4(largest, m, b) and not _thm_3_4(largest + 1, m, b)
        assert B.feasible_region(largest, m, b)["feasible"]
        assert B.feasible_region(largest, m, b)["max_n_any_dim"] == pytest.approx(n_max)
        with pytest.raises(ValueError, match="Thm 3.4"):
            B.validate(largest + 1, m, b)
    assert B.max_pairs_any_dim(0.3, 0.0) == math.inf and B.max_pairs_any_dim(0.5) == math.inf


def test_missing_scipy_names_the_research_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "scipy.special", None)
    with pytest.raises(ImportError, match=r"open_clip_sigrel\[research\]"):
        B.log_cap_fraction(5, 0.5)
    rc, out, err = _cli("--n", "123457", "--margin", "0.2173", "--rel-bias", "0.1")  # not in the lru caches
    assert rc == 1 and out == "" and "research" in err


@pytest.mark.parametrize("margin", [1e-13, 1e-10, 5e-17, 1e-300])
def test_tiny_positive_margins_are_refused_not_reported_as_fitting_in_d1(margin) -> None:
    """Issue 12: --n 3 --margin 1e-13 claimed 'N pairs fit in d = 1 [rigorous]' (false for every m > 0:
    in R^1 the 3 pairs would need 3 mutually antipodal unit vectors)."""
    with pytest.raises(ValueError, match="below 1e-09"):
        B.constellation_bounds(3, margin)
    rc, out, err = _cli("--n", "3", "--margin", str(margin))
    assert rc == 2 and out == "" and "error:" in err and "below 1e-09" in err


_BAD_NUMBERS = ("nan", "inf", "-inf", "-1", "1e300", "1e-300", "0", "-0.5")


@pytest.mark.parametrize("flag", ["--n", "--margin", "--rel-bias", "--dim"])
@pytest.mark.parametrize("value", _BAD_NUMBERS)
def test_cli_numeric_flags_fuzz(flag, value) -> None:
    """Every bad value of every numeric flag: rc 2 with an 'error:' line and nothing on stdout, quickly."""
    args = {"--n": "10", "--margin": "0.1"}
    args[flag] = value
    argv = [a for kv in args.items() for a in kv]
    try:
        rc, out, err = _cli(*argv)
    except SystemExit as e:  # argparse's parser.error
        rc, out, err = e.code, "", "error:"
    ok_values = {("--margin", "0"), ("--rel-bias", "0"), ("--rel-bias", "-0.5"), ("--rel-bias", "1e-300")}
    if (flag, value) in ok_values:
        return  # valid inputs (m = 0, b_rel in range)
    assert rc == 2 and out == "" and "error:" in err, (flag, value, rc, err)


def test_smallest_accepted_margin_does_not_claim_d1_for_three_pairs() -> None:
    res = B.constellation_bounds(3, 1e-9)
    assert res["rigorous"]["dim_min"]["upper"] >= 2  # 3 pairs never fit in d = 1 with m > 0
    assert B.constellation_bounds(3, 0.0)["rigorous"]["dim_min"]["upper"] == 1  # m = 0: exact, any N in d = 1
