"""linear_separability: 1.0 exactly on separable sets (checked against a direct LP), a certified lower bound otherwise."""
import numpy as np
import pytest
import torch

from open_clip_sigrel.metrics import geometry_metrics, linear_separability
from open_clip_sigrel.metrics import separability as sep_mod
from open_clip_sigrel.metrics.inputs import prepare_features
from open_clip_sigrel.metrics.separability import separability

linprog = pytest.importorskip("scipy.optimize").linprog


def _lp_separable(x, y) -> bool:
    """The reference: x.w + c >= 1, y.w + c <= -1 feasible (HiGHS), on the normalised float64 rows."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    n, d = x.shape
    a = np.vstack([np.hstack([-x, -np.ones((n, 1))]), np.hstack([y, np.ones((n, 1))])])
    r = linprog(np.zeros(d + 1), A_ub=a, b_ub=-np.ones(2 * n), bounds=[(None, None)] * (d + 1), method="highs")
    assert r.status in (0, 2), r.message
    return r.status == 0


def _count(res, x, y) -> float:
    """The accuracy of the returned classifier, recounted directly in float64."""
    x, y = (t.to(torch.float64).numpy() for t in prepare_features(x, y))  # the points it classified
    return (np.count_nonzero(x @ res.w + res.c > 0) + np.count_nonzero(y @ res.w + res.c <= 0)) / (2 * len(x))


def _adversarial(n, d, margin, dtype, seed=0):
    """Separable along e_0 by `margin`, class centroids offset along e_1 (orthogonal to it) with big spread."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a[:, 0] = margin * (1 + rng.random(n))
    b[:, 0] = -margin * (1 + rng.random(n))
    a[:, 1] += 1.0
    b[:, 1] -= 1.0
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(dtype), b.astype(dtype)


def _centroid_accuracy(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = x.mean(0) - y.mean(0)
    c = -w @ (x.mean(0) + y.mean(0)) / 2
    return (np.count_nonzero(x @ w + c > 0) + np.count_nonzero(y @ w + c <= 0)) / (2 * len(x))


@pytest.mark.parametrize("margin,dtype", [(1e-4, np.float32), (1e-6, np.float64), (1e-8, np.float64)])
def test_adversarial_separable_sets_give_one(margin, dtype):
    x, y = _adversarial(3000, 64, margin, dtype)
    assert _lp_separable(x, y)
    assert _centroid_accuracy(x, y) < 0.9  # the centroids point the wrong way: no cheap answer
    res = separability(torch.from_numpy(x), torch.from_numpy(y))
    assert res.accuracy == 1.0 and res.separable is True
    assert _count(res, x, y) == 1.0  # the classifier it reports really separates
    if dtype == np.float32:
        assert geometry_metrics(x, y, metrics="separability")["linear_separability"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_small_random_sets_agree_with_the_lp(seed):
    """Both sides of Cover's threshold (2N points, d + 1 parameters): 1.0 iff the LP is feasible."""
    rng = np.random.default_rng(seed)
    for n, d in ((12, 16), (20, 16), (40, 16), (200, 8)):
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.05
        res = separability(x, y)
        assert (res.accuracy == 1.0) == _lp_separable(x, y) == res.separable, (n, d)
        assert res.accuracy == _count(res, x, y)


def test_non_separable_reports_a_real_classifier():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(600, 32, generator=g), dim=-1)
    y = torch.nn.functional.normalize(x + 1.2 * torch.randn(600, 32, generator=g), dim=-1)
    assert not _lp_separable(x.numpy(), y.numpy())
    res = separability(x, y)
    assert res.separable is False and "not separable" in res.how
    assert 0.5 <= res.accuracy < 1.0
    assert res.accuracy == _count(res, x.numpy(), y.numpy())


def test_identical_sets_are_one_half():
    x = np.random.default_rng(1).normal(size=(50, 6))
    assert linear_separability(x, x) == 0.5


def _xor(n, d, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, size=(n, 1)) * 2 - 1
    x = np.hstack([np.hstack([q, q]) + 0.35 * rng.normal(size=(n, 2)), 0.3 * rng.normal(size=(n, d - 2))])
    q = rng.integers(0, 2, size=(n, 1)) * 2 - 1
    y = np.hstack([np.hstack([q, -q]) + 0.35 * rng.normal(size=(n, 2)), 0.3 * rng.normal(size=(n, d - 2))])
    return x, y


def test_xor_lower_bound_reaches_the_best_simple_line():
    x, y = _xor(2000, 16)
    assert not _lp_separable(x, y)
    xn, yn = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    best_line = 0.0  # brute force: lines in the XOR plane, every threshold
    for angle in np.linspace(0, np.pi, 361):
        w = np.zeros(16)
        w[:2] = np.cos(angle), np.sin(angle)
        for s in (1, -1):
            sx, sy = s * xn @ w, s * yn @ w
            cuts = np.concatenate([sx, sy])  # "image" iff score > cut
            correct = (2000 - np.searchsorted(np.sort(sx), cuts, "right")) + np.searchsorted(np.sort(sy), cuts, "right")
            acc = correct.max() / 4000
            best_line = max(best_line, acc)
    assert best_line > 0.7
    res = separability(x, y)
    assert res.separable is False
    assert res.accuracy >= best_line - 0.01  # the old fits gave ~0.5 here
    assert res.accuracy == _count(res, x, y)


def test_without_scipy_separable_sets_still_certified_and_others_warn(monkeypatch):
    def missing(module, extra):
        raise ImportError(f"{module} is not installed; it comes with the '{extra}' extra")

    monkeypatch.setattr(sep_mod, "require", missing)
    x = np.random.default_rng(2).normal(size=(30, 8))
    assert linear_separability(x + 3, x - 3) == 1.0  # the centroid classifier certifies it, no LP needed
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    b = a + torch.randn(300, 8, generator=g)
    with pytest.warns(RuntimeWarning, match="lower bound"):
        res = separability(a, b)
    assert res.separable is None and res.accuracy < 1.0


def test_bad_max_iter_is_an_error():
    x = np.eye(3)
    with pytest.raises(ValueError, match="max_iter"):
        linear_separability(x, -x, max_iter=-1)


def test_under_inference_mode_the_fits_still_run():
    """open_clip's evaluate() runs under inference_mode; the L-BFGS fit needs autograd (a non-centroid set)."""
    x, y = _adversarial(400, 16, 1e-3, np.float32)
    with torch.inference_mode():
        res = separability(torch.from_numpy(x), torch.from_numpy(y))
    assert res.accuracy == 1.0
