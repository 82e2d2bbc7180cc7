"""geometry_metrics against dense float64 numpy, constructions with known answers, exact percentiles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from open_clip_sigrel.loss import sigrel_loss
from open_clip_sigrel.metrics import geometry as geo
from open_clip_sigrel.metrics import inputs
from open_clip_sigrel.metrics import percentile as pctl
from open_clip_sigrel.metrics.geometry import geometry_metrics


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def dense_reference(X, Y, logit_scale=None, logit_bias=None) -> dict[str, float]:
    """Every metric the direct way, from the full N x N matrices."""
    x, y = _unit(np.asarray(X, np.float64)), _unit(np.asarray(Y, np.float64))
    n = len(x)
    s = x @ y.T
    off = ~np.eye(n, dtype=bool)
    pos, neg = np.diag(s), s[off]
    r = {"n_pairs": n, "pos_sim_mean": pos.mean(), "neg_sim_mean": neg.mean()}
    r["margin_worst"] = (pos.min() - neg.max()) / 2
    r["rel_bias_worst"] = (pos.min() + neg.max()) / 2
    r["margin_mean"] = (pos.mean() - neg.mean()) / 2
    r["rel_bias_mean"] = (pos.mean() + neg.mean()) / 2
    p5, p95 = np.percentile(pos, 5), np.percentile(neg, 95)
    r["margin_trimmed"], r["rel_bias_trimmed"] = (p5 - p95) / 2, (p5 + p95) / 2
    thr = -logit_bias / logit_scale if (logit_scale is not None and logit_bias is not None) else r["rel_bias_mean"]
    r["violation_threshold"] = thr
    r["pos_violations"] = int((pos < thr).sum())
    r["neg_violations"] = int((neg > thr).sum())
    z = x - y
    r["xi"] = np.mean(np.sum((z - z.mean(0)) ** 2, axis=1))
    mx, my = x.mean(0), y.mean(0)
    r["gap_l2m"] = np.linalg.norm(mx - my)
    r["gap_centroid_cosine"] = 1 - mx @ my / (np.linalg.norm(mx) * np.linalg.norm(my))
    r["gap_l2i"] = np.mean(np.linalg.norm(z, axis=1))
    gx, gy = x @ x.T, y @ y.T
    d_m = max(np.mean((1 - pos) / 2), 1e-3)
    d_i, d_t = np.mean((1 - gx[off]) / 2), np.mean((1 - gy[off]) / 2)
    r["rmg"] = d_m / (d_m + (d_i + d_t) / 2)
    r["cone_image"], r["cone_text"] = gx[off].mean(), gy[off].mean()
    for name, u in (("image", x), ("text", y)):
        sq = np.sum((u[:, None, :] - u[None, :, :]) ** 2, axis=-1)
        r[f"uniformity_{name}"] = np.log(np.mean(np.exp(-2 * sq[off])))
    r["alignment"] = np.mean(np.sum(z**2, axis=1))
    for name, mat in (("image_to_text", s), ("text_to_image", s.T)):
        higher = (mat > np.diag(mat)[:, None]).sum(1)  # strict: ties count for the match
        for k in (1, 5, 10):
            r[f"{name}_R@{k}"] = np.mean(higher < k)
        r[f"{name}_mean_rank"] = higher.mean() + 1
        r[f"{name}_median_rank"] = np.floor(np.median(higher)) + 1
    if logit_scale is not None:
        b = 0.0 if logit_bias is None else logit_bias
        logits = logit_scale * s + b
        labels = 2 * np.eye(n) - 1
        r.update(logit_scale=logit_scale, logit_bias=b, rel_bias_model=-b / logit_scale,
                 sigmoid_loss=np.sum(np.logaddexp(0, -labels * logits)) / n)
    return r


def _pairs(n, d, noise, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x + noise * rng.normal(size=(n, d)) + shift
    return x, y


def _assert_matches(got, want):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k


KEYS = [
    "n_pairs", "pos_sim_mean", "neg_sim_mean", "margin_worst", "rel_bias_worst", "margin_mean",
    "rel_bias_mean", "margin_trimmed", "rel_bias_trimmed", "violation_threshold", "pos_violations",
    "neg_violations", "linear_separability", "xi", "gap_l2m", "gap_centroid_cosine", "gap_l2i", "rmg",
    "cone_image", "cone_text", "uniformity_image", "uniformity_text", "alignment",
    "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
    "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10",
]


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 36])
def test_all_metrics_match_dense_reference(chunk_size):
    x, y = _pairs(37, 6, 0.8, seed=1, shift=0.3)
    got = geometry_metrics(x, y, logit_scale=10.0, logit_bias=-3.0, chunk_size=chunk_size)
    for k in KEYS + ["logit_scale", "logit_bias", "rel_bias_model", "sigmoid_loss"]:
        assert k in got, k
    _assert_matches(got, dense_reference(x, y, 10.0, -3.0))


@pytest.mark.parametrize("chunk_size, elements", [(5, 60), (7, 7), (36, 100), (1, 1)])
def test_column_tiles_match_dense_reference(monkeypatch, chunk_size, elements):
    # tiles of chunk_size rows x (elements // chunk_size) columns, none dividing N = 37
    monkeypatch.setattr(geo, "_CHUNK_ELEMENTS", elements)
    x, y = _pairs(37, 6, 0.8, seed=11, shift=0.2)
    got = geometry_metrics(x, y, logit_scale=4.0, logit_bias=-1.0, chunk_size=chunk_size)
    _assert_matches(got, dense_reference(x, y, 4.0, -1.0))


def test_without_model_scalars_and_torch_float32_inputs():
    x, y = _pairs(50, 8, 0.5, seed=2)
    got64 = geometry_metrics(torch.tensor(x), torch.tensor(y))
    assert "sigmoid_loss" not in got64 and "logit_scale" not in got64
    _assert_matches(got64, dense_reference(x, y))
    assert got64["violation_threshold"] == pytest.approx(got64["rel_bias_mean"])
    got32 = geometry_metrics(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    for k in KEYS:
        assert got32[k] == pytest.approx(got64[k], rel=1e-5, abs=1e-5), k


def test_logit_scale_only_and_loss_equals_sigrel_loss():
    x, y = _pairs(40, 5, 1.0, seed=3)
    got = geometry_metrics(x, y, logit_scale=7.5, chunk_size=7)
    assert got["logit_bias"] == 0.0 and got["rel_bias_model"] == 0.0
    assert got["violation_threshold"] == pytest.approx(got["rel_bias_mean"])
    _assert_matches(got, dense_reference(x, y, 7.5, None))
    xt, yt = torch.tensor(_unit(x)), torch.tensor(_unit(y))
    for bias in (-4.0, 2.0):
        got = geometry_metrics(x, y, logit_scale=7.5, logit_bias=bias, chunk_size=3)
        want = sigrel_loss(xt, yt, 7.5, -bias / 7.5, normalize="batch")
        assert got["sigmoid_loss"] == pytest.approx(float(want), rel=1e-12)
        assert got["rel_bias_model"] == pytest.approx(-bias / 7.5)
        assert got["violation_threshold"] == pytest.approx(-bias / 7.5)


def test_simplex_code():
    d = 7
    n = d + 1
    e = np.eye(n) - 1.0 / n  # centred standard basis: a regular simplex in a d-dim subspace
    u = _unit(e)
    got = geometry_metrics(u, u)
    assert got["margin_worst"] == pytest.approx((1 + 1 / d) / 2)
    assert got["rel_bias_worst"] == pytest.approx((1 - 1 / d) / 2)
    assert got["xi"] == pytest.approx(0.0, abs=1e-14)
    assert got["neg_sim_mean"] == pytest.approx(-1 / d)
    assert got["cone_image"] == pytest.approx(-1 / d)
    assert got["alignment"] == pytest.approx(0.0, abs=1e-14)
    assert got["gap_l2i"] == pytest.approx(0.0, abs=1e-7)
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0
    assert got["pos_violations"] == 0 and got["neg_violations"] == 0
    assert got["rmg"] == pytest.approx(1e-3 / (1e-3 + (1 + 1 / d) / 2))  # D_match clamped at 1e-3
    assert got["linear_separability"] == 0.5  # identical sets: every classifier gets one of each pair


def test_cross_polytope_off_diagonal_max_is_zero():
    d = 6
    u = np.concatenate([np.eye(d), -np.eye(d)])  # +-e_i, pairs (e_i, e_i)
    got = geometry_metrics(u, u)
    with np.errstate(invalid="ignore"):
        want = dense_reference(u, u)
    assert np.isnan(want.pop("gap_centroid_cosine"))  # both centroids are 0: cos taken as 0
    assert got["gap_centroid_cosine"] == 1.0
    _assert_matches(got, want)
    assert got["margin_worst"] == pytest.approx(0.5)  # (1 - 0) / 2
    assert got["rel_bias_worst"] == pytest.approx(0.5)
    assert got["margin_trimmed"] == pytest.approx(0.5)  # >95% of negatives are exactly 0


def test_shifted_set_known_centroid_gap():
    rng = np.random.default_rng(4)
    n, d = 64, 5
    base = np.concatenate([rng.normal(size=(n, d - 1)) * 1e-3, np.zeros((n, 1))], axis=1)
    a = np.zeros(d)
    a[-1] = 1.0
    x = _unit(base + a)  # ~ +e_d, tiny spread
    y = _unit(base - a)  # ~ -e_d
    got = geometry_metrics(x, y)
    assert got["gap_l2m"] == pytest.approx(2.0, abs=1e-5)
    assert got["gap_centroid_cosine"] == pytest.approx(2.0, abs=1e-5)
    assert got["linear_separability"] == 1.0
    assert got["cone_image"] == pytest.approx(1.0, abs=1e-5)
    _assert_matches(got, dense_reference(x, y))


def test_separable_vs_not():
    rng = np.random.default_rng(5)
    n, d = 60, 50
    x = _unit(rng.normal(size=(n, d)))
    y = _unit(rng.normal(size=(n, d)))
    # 120 random points in 51 parameters are not separable in general; add a small offset along e_0
    xs, ys = x.copy(), y.copy()
    xs[:, 0] += 0.3
    ys[:, 0] -= 0.3
    assert geometry_metrics(xs, ys)["linear_separability"] == 1.0
    assert geometry_metrics(x, x)["linear_separability"] == 0.5
    # 60 points in general position in 80 dimensions are always separable, not along the centroid
    a, b = rng.normal(size=(30, 80)), rng.normal(size=(30, 80))
    assert geometry_metrics(a, b)["linear_separability"] == 1.0


def test_retrieval_ties_favour_the_match():
    # two identical texts: both images have their match tied with the other text
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = geometry_metrics(x, y)
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0


band_select = pctl.BandSelect


def test_percentile_is_exact_even_when_selection_must_narrow_and_refine(monkeypatch):
    x, y = _pairs(61, 4, 1.5, seed=6)
    want = dense_reference(x, y)["rel_bias_trimmed"]
    # 61 * 60 = 3660 negatives; small caps make the band narrow many times while the pass runs
    for cap in (16, 64, 1024):
        monkeypatch.setattr(pctl, "BandSelect", _SmallCap(band_select, cap))
        got = geometry_metrics(x, y, chunk_size=4)
        assert got["rel_bias_trimmed"] == pytest.approx(want, rel=1e-14)


class _SmallCap:
    """Wraps BandSelect so its cap is tiny (geometry_metrics clamps the cap at 1024 values)."""

    def __init__(self, cls, cap):
        self.cls, self.cap = cls, cap

    def __call__(self, total, q, cap, dtype, device):
        return self.cls(total, q, self.cap, dtype, device)


def _stream(values: np.ndarray, block: int, masked: int = 0):
    def blocks():
        t = torch.as_tensor(values)
        for lo in range(0, len(t), block):
            b = t[lo:lo + block]
            if masked:
                b = torch.cat([b, torch.full((masked,), -math.inf, dtype=t.dtype)])
            yield b, masked
    return blocks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "constant", "two_values"])
@pytest.mark.parametrize("pct", [95, 5, 50, 100, 0])
def test_streamed_percentile_equals_numpy(dtype, kind, pct):
    rng = np.random.default_rng(7)
    n = 2003
    if kind == "normal":
        v = rng.normal(size=n)
    elif kind == "ties":
        v = rng.integers(-3, 4, size=n) / 4.0
    elif kind == "sorted":
        v = np.sort(rng.normal(size=n))  # adversarial order for the running estimate
    elif kind == "constant":
        v = np.full(n, 0.25)
    else:
        v = np.where(rng.random(n) < 0.97, -0.5, 0.5)
    v = v.astype(dtype)
    want = np.percentile(v.astype(np.float64), pct)
    for cap in (16, 100, 5000):  # 16 and 100 force narrowing / radix passes
        got = pctl.streamed_percentile(_stream(v, 97, masked=3), n, pct / 100, cap, torch.from_numpy(v).dtype,
                                       torch.device("cpu"))
        assert got == want, (cap, got, want)


def test_radix_select_alone_finds_every_order_statistic():
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        v = np.concatenate([rng.normal(size=300), [-0.0, 0.0, 1e-30, -1e-30, 3.0, 3.0]]).astype(dtype)
        s = np.sort(v)
        for k in (0, 1, 150, 304, 305):
            sel = pctl.RadixSelect(k, len(v), 16, torch.from_numpy(v).dtype)
            while sel.result is None:
                sel.begin()
                for b, m in _stream(v, 50, masked=2)():
                    sel.add(b, m)
                sel.finish()
            assert sel.result == s[k]


def test_bad_inputs():
    x, y = _pairs(5, 3, 0.1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = x.copy()
        bad[2, 1] = np.nan
        geometry_metrics(bad, y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = y.copy()
        bad[0, 0] = np.inf
        geometry_metrics(x, bad)
    with pytest.raises(ValueError, match="2-D"):
        geometry_metrics(x[0], y[0])
    with pytest.raises(ValueError, match="same shape"):
        geometry_metrics(x, y[:4])
    with pytest.raises(ValueError, match="same shape"):
        geometry_metrics(x, y[:, :2])
    with pytest.raises(ValueError, match="N >= 2"):
        geometry_metrics(x[:1], y[:1])
    with pytest.raises(ValueError, match="all-zero row"):
        z = x.copy()
        z[3] = 0
        geometry_metrics(z, y)
    with pytest.raises(ValueError, match="without logit_scale"):
        geometry_metrics(x, y, logit_bias=-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        geometry_metrics(x, y, logit_scale=0.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        geometry_metrics(x, y, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="chunk_size"):
        geometry_metrics(x, y, chunk_size=0)
    with pytest.raises(ValueError, match="real-valued"):
        geometry_metrics(x.astype(complex), y)


def test_inputs_already_normalised_are_used_in_place_and_N2_works():
    x, y = _pairs(2, 3, 0.5)
    xt, yt = torch.tensor(_unit(x)), torch.tensor(_unit(y))
    assert inputs._normalise(xt, torch.float64, "x") is xt
    got = geometry_metrics(xt, yt, logit_scale=torch.tensor(5.0), logit_bias=torch.tensor([-1.0]))
    _assert_matches(got, dense_reference(x, y, 5.0, -1.0))


def test_plots_write_pngs(tmp_path):
    from open_clip_sigrel.tools import plots

    x, y = _pairs(300, 16, 1.0, seed=9, shift=0.2)
    m = geometry_metrics(x, y, logit_scale=10.0, logit_bias=-2.0)
    p1 = plots.plot_similarity_histograms(x, y, tmp_path / "h.png", metrics=m, max_negatives=5000)
    p2 = plots.plot_modality_projection(x, y, tmp_path / "p.png")
    jl = tmp_path / "results.jsonl"
    with open(jl, "w") as f:
        for e in range(1, 4):
            f.write(f'{{"epoch": {e}, "logit_scale": {10 + e}, "rel_bias_model": {0.1 * e}, '
                    f'"margin_mean": {0.01 * e}, "image_to_text_R@1": {0.2 * e}}}\n')
    p3 = plots.plot_training_curves(jl, tmp_path / "c.png")
    for p in (p1, p2, p3):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    p4 = plots.plot_similarity_histograms(torch.tensor(x), torch.tensor(y), tmp_path / "h2.png")
    assert p4.stat().st_size > 1000


def test_works_under_inference_mode():
    """open_clip's evaluate() computes features under torch.inference_mode; the separability fit needs autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1)
    with torch.inference_mode():
        out = geometry_metrics(x, y, logit_scale=10.0)
    assert out["linear_separability"] == geometry_metrics(x, y, logit_scale=10.0)["linear_separability"]
