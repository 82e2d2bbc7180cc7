"""The composable geometry metrics: functionals against direct float64 formulas, metric groups (only their
work is done, same numbers as the full call), the mergeable GeometryMetric, the training hook's presets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from open_clip_sigrel.loss import sigrel_loss
from open_clip_sigrel.metrics import (
    ALL_GROUPS,
    CHEAP_GROUPS,
    GROUPS,
    GeometryMetric,
    geometry_metrics,
    linear_separability,
    margin_and_rel_bias,
    margins,
    modality_gap,
    pair_statistics,
    retrieval,
    trimmed_margins,
    violations,
)
from open_clip_sigrel.metrics import geometry as geo
from open_clip_sigrel.metrics import percentile as pctl

MODEL_KEYS = {"logit_scale", "logit_bias", "rel_bias_model"}


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _pairs(n=41, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, x + 0.9 * rng.normal(size=(n, d)) + 0.2


def _dense(x, y):
    x, y = _unit(np.asarray(x, np.float64)), _unit(np.asarray(y, np.float64))
    s = x @ y.T
    off = ~np.eye(len(x), dtype=bool)
    return x, y, s, np.diag(s).copy(), s[off]


# ------------------------------------------------------------------------------------ functionals
def test_margin_functionals_match_direct_float64_formulas():
    x, y, s, pos, neg = _dense(*_pairs())
    p = torch.from_numpy(pos)
    got = margins(p, neg_max=neg.max(), neg_mean=neg.mean())
    assert got["margin_worst"] == pytest.approx((pos.min() - neg.max()) / 2, rel=1e-14)
    assert got["rel_bias_worst"] == pytest.approx((pos.min() + neg.max()) / 2, rel=1e-14)
    assert got["margin_mean"] == pytest.approx((pos.mean() - neg.mean()) / 2, rel=1e-12)
    assert got["rel_bias_mean"] == pytest.approx((pos.mean() + neg.mean()) / 2, rel=1e-12)
    p5, p95 = np.percentile(pos, 5), np.percentile(neg, 95)
    tr = trimmed_margins(p, neg_p95=p95)
    assert tr == pytest.approx({"margin_trimmed": (p5 - p95) / 2, "rel_bias_trimmed": (p5 + p95) / 2}, rel=1e-14)
    thr = 0.1
    v = violations(p, neg_above=int((neg > thr).sum()), threshold=thr)
    assert v["pos_violations"] == int((pos < thr).sum()) and v["neg_violations"] == int((neg > thr).sum())
    m, b = margin_and_rel_bias(torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.7]))
    assert torch.allclose(m, torch.tensor([0.4, -0.1])) and torch.allclose(b, torch.tensor([0.5, 0.6]))


def test_pair_statistics_and_modality_gap_match_direct_formulas():
    x0, y0 = _pairs(seed=1)
    x, y, s, pos, neg = _dense(x0, y0)
    st = pair_statistics(x0, y0)
    np.testing.assert_allclose(st.pos.numpy(), pos, rtol=1e-14)
    assert st.neg_mean == pytest.approx(neg.mean(), rel=1e-12)
    g = modality_gap(st)
    off = ~np.eye(len(x), dtype=bool)
    mx, my = x.mean(0), y.mean(0)
    assert g["gap_l2m"] == pytest.approx(np.linalg.norm(mx - my), rel=1e-12)
    assert g["gap_l2i"] == pytest.approx(np.linalg.norm(x - y, axis=1).mean(), rel=1e-12)
    assert g["cone_text"] == pytest.approx((y @ y.T)[off].mean(), rel=1e-10)
    z = x - y
    assert g["xi"] == pytest.approx(((z - z.mean(0)) ** 2).sum(1).mean(), rel=1e-12)


def test_retrieval_equals_open_clips_get_clip_metrics_without_ties():
    from open_clip_train.train import get_clip_metrics

    x0, y0 = _pairs(n=60, d=4, seed=2)
    x, y, s, _, _ = _dense(x0, y0)
    higher_i2t = torch.from_numpy((s > np.diag(s)[:, None]).sum(1))
    higher_t2i = torch.from_numpy((s.T > np.diag(s)[:, None]).sum(1))
    got = retrieval(higher_i2t, higher_t2i)
    want = get_clip_metrics(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(1.0))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v), rel=1e-12), k
    assert geometry_metrics(x0, y0, metrics="retrieval", chunk_size=7) == {"n_pairs": 60, **got}


def test_linear_separability_functional_equals_the_group():
    x, y = _pairs(n=30, d=3, seed=3)
    acc = linear_separability(x, y)
    assert 0.5 <= acc <= 1.0
    assert geometry_metrics(x, y, metrics="separability")["linear_separability"] == acc
    xs = np.asarray(x).copy()
    xs[:, 0] = np.abs(xs[:, 0]) + 0.1  # every x_i in the half-space u_0 > 0, every -x_i outside it
    assert linear_separability(xs, -xs) == 1.0
    assert linear_separability(x, x) == 0.5


# ----------------------------------------------------------------------------------------- groups
def test_each_group_alone_gives_its_keys_and_the_full_calls_numbers():
    x, y = _pairs(n=37, d=5, seed=4)
    kw = dict(logit_scale=8.0, logit_bias=-2.0, chunk_size=5)
    full = geometry_metrics(x, y, **kw)
    assert set(full) == {"n_pairs", *MODEL_KEYS, *(k for keys in GROUPS.values() for k in keys)}
    for group in ALL_GROUPS:
        got = geometry_metrics(x, y, metrics=group, **kw)
        assert set(got) == {"n_pairs", *MODEL_KEYS, *GROUPS[group]}, group
        assert got == {k: full[k] for k in got}, group  # exactly the same numbers
    pair = geometry_metrics(x, y, metrics=["loss", "trimmed"], **kw)
    assert set(pair) == {"n_pairs", *MODEL_KEYS, "sigmoid_loss", "margin_trimmed", "rel_bias_trimmed"}
    without_model = geometry_metrics(x, y, metrics=("gap",))
    assert set(without_model) == {"n_pairs", *GROUPS["gap"]}


def test_group_selection_errors():
    x, y = _pairs(n=5, d=3)
    with pytest.raises(ValueError, match=r"unknown geometry metric group\(s\) 'margin'.*valid groups: margins, "):
        geometry_metrics(x, y, metrics=["margin"])
    with pytest.raises(ValueError, match="names no group"):
        geometry_metrics(x, y, metrics=[])
    assert geometry_metrics(x, y, metrics=["loss"]) == {"n_pairs": 5}  # no model, no loss
    with pytest.raises(ValueError, match="unknown geometry metric group"):
        GeometryMetric(metrics=("margins", "bogus"))
    assert "sigmoid_loss" not in geometry_metrics(x, y)  # all groups: the loss only with logit_scale


def _forbid(monkeypatch, module, name):
    def boom(*a, **k):
        raise AssertionError(f"{name} ran")
    monkeypatch.setattr(module, name, boom)


def test_only_the_requested_work_runs(monkeypatch):
    x, y = _pairs(n=50, d=4, seed=5)
    full = geometry_metrics(x, y, logit_scale=5.0)
    _forbid(monkeypatch, geo, "linear_separability")
    _forbid(monkeypatch, pctl, "BandSelect")
    _forbid(monkeypatch, pctl, "streamed_percentile")
    cheap = geometry_metrics(x, y, logit_scale=5.0, metrics=CHEAP_GROUPS)  # no L-BFGS, no exact percentile
    assert "linear_separability" not in cheap and "margin_trimmed" not in cheap
    assert cheap == {k: full[k] for k in cheap}
    _forbid(monkeypatch, geo, "_cross_pass")
    _forbid(monkeypatch, geo, "_uniformity")
    gap = geometry_metrics(x, y, metrics="gap")  # O(N d) only: no pass over pairs
    assert gap == {k: full[k] for k in gap}


def test_sigmoid_loss_is_the_loss_kernels_value(monkeypatch):
    from open_clip_sigrel.loss import kernel

    x, y = _pairs(n=23, d=4, seed=6)
    xt, yt = torch.tensor(_unit(x)), torch.tensor(_unit(y))
    calls = []
    real = kernel.pair_terms_
    monkeypatch.setattr(geo, "pair_terms_", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = geometry_metrics(x, y, logit_scale=6.0, logit_bias=-1.5, metrics="loss", chunk_size=4)
    assert calls  # through the package's pair-sum kernel
    want = sigrel_loss(xt, yt, 6.0, 1.5 / 6.0, normalize="batch")
    assert got["sigmoid_loss"] == pytest.approx(float(want), rel=1e-12)
    s = _unit(x) @ _unit(y).T
    labels = 2 * np.eye(23) - 1
    direct = np.logaddexp(0, -labels * (6.0 * s - 1.5)).sum() / 23
    assert got["sigmoid_loss"] == pytest.approx(direct, rel=1e-12)


def test_float32_loss_keeps_float32_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = x + 0.8 * torch.randn(300, 16, generator=g)
    ref = geometry_metrics(x.double(), y.double(), logit_scale=10.0, logit_bias=-3.0, metrics="loss")
    got = geometry_metrics(x, y, logit_scale=10.0, logit_bias=-3.0, metrics="loss")
    assert got["sigmoid_loss"] == pytest.approx(ref["sigmoid_loss"], rel=1e-7)


# ------------------------------------------------------------------------------------- the object
SPLITS = [(37,), (1, 36), (5, 7, 25), (10, 0, 20, 7), (2,) * 18 + (1,)]


@pytest.mark.parametrize("sizes", SPLITS)
def test_metric_updates_equal_the_one_shot_call(sizes):
    x, y = _pairs(n=37, d=5, seed=7)
    x32, y32 = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    kw = dict(logit_scale=9.0, logit_bias=-4.0, chunk_size=6)
    for xs, ys in ((x, y), (x32, y32)):
        m = GeometryMetric(**kw)
        lo = 0
        for n in sizes:
            m.update(xs[lo:lo + n], ys[lo:lo + n])
            lo += n
        assert m.n_pairs == 37
        assert m.compute() == geometry_metrics(xs, ys, **kw)


def test_merge_reset_and_errors():
    x, y = _pairs(n=30, d=4, seed=8)
    a, b = GeometryMetric(metrics=CHEAP_GROUPS), GeometryMetric(metrics=CHEAP_GROUPS)
    a.update(x[:11], y[:11])
    b.update(x[11:20], y[11:20])
    b.update(x[20:], y[20:])
    assert a.merge(b) is a
    assert a.compute() == geometry_metrics(x, y, metrics=CHEAP_GROUPS)
    a.reset()
    with pytest.raises(ValueError, match="before any update"):
        a.compute()
    a.update(x[:9], y[:9])
    assert a.compute() == geometry_metrics(x[:9], y[:9], metrics=CHEAP_GROUPS)
    src = torch.tensor(x[:5])
    c = GeometryMetric()
    c.update(src, torch.tensor(y[:5]))
    src.zero_()  # the state holds its own copy
    assert c.compute() == geometry_metrics(x[:5], y[:5])
    with pytest.raises(ValueError, match="same shape"):
        c.update(x[:3], y[:4])
    with pytest.raises(ValueError, match="dimension 3, earlier batches 4"):
        c.update(x[:3, :3], y[:3, :3])
    with pytest.raises(ValueError, match="2-D"):
        c.update(x[0], y[0])
    with pytest.raises(ValueError, match="cannot merge features of dimension 2"):
        d = GeometryMetric()
        d.update(x[:3, :2], y[:3, :2])
        c.merge(d)
    with pytest.raises(TypeError, match="merge a GeometryMetric"):
        c.merge({})
    with pytest.raises(ValueError, match="dist_reduce_fx 'sum'"):
        c.add_state("count", dist_reduce_fx="sum")


# ------------------------------------------------------------------------------- training hook
def _hook(preset_args):
    from open_clip_sigrel.cli import train as sigrel_train
    from open_clip_sigrel.hosts import common

    args = sigrel_train.parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny", *preset_args])
    return args, common.SigrelRun(args)


@pytest.mark.parametrize("flags, groups", [((), CHEAP_GROUPS), (("--sigrel-geometry", "full"), ALL_GROUPS),
                                           (("--sigrel-geometry", "off"), None), (("--sigrel-no-geometry",), None),
                                           (("--sigrel-geometry", "cheap"), CHEAP_GROUPS)])
def test_training_hook_presets(flags, groups):
    args, run = _hook(flags)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(48, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(48, 8, generator=g), dim=-1)

    def stock(image_features, text_features, logit_scale):
        return {"image_to_text_R@1": -1.0}

    with torch.inference_mode():  # as open_clip's evaluate(); the L-BFGS fit of "full" needs autograd
        got = run.get_clip_metrics(stock, image_features=[x[:20], x[20:]], text_features=[y[:20], y[20:]],
                                   logit_scale=torch.tensor(10.0))
    assert got["image_to_text_R@1"] == -1.0  # open_clip's own values are kept
    if groups is None:
        assert got == {"image_to_text_R@1": -1.0}
        return
    want = geometry_metrics(x, y, logit_scale=10.0, metrics=groups)
    assert {k: v for k, v in got.items() if k != "image_to_text_R@1"} == {k: v for k, v in want.items()
                                                                          if k != "image_to_text_R@1"}
    assert ("linear_separability" in got) == ("separability" in groups)
    assert ("margin_trimmed" in got) == ("trimmed" in groups)


def test_batch_constellation_uses_float64_sums():
    from open_clip_sigrel.hosts.telemetry import batch_constellation

    x0, y0 = _pairs(n=40, d=6, seed=9)
    x, y, s, pos, neg = _dense(x0, y0)
    got = batch_constellation(torch.tensor(x0, dtype=torch.float32), torch.tensor(y0, dtype=torch.float32),
                              chunk_size=7)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in got.values())
    assert float(got["margin_worst"]) == pytest.approx((pos.min() - neg.max()) / 2, abs=1e-6)
    assert float(got["rel_bias_mean"]) == pytest.approx((pos.mean() + neg.mean()) / 2, abs=1e-7)
    assert float(got["margin_mean"]) == pytest.approx((pos.mean() - neg.mean()) / 2, abs=1e-7)
