"""Linear separability of the two modalities (Bangachev et al. 2025, Thm 3.6).

    linear_separability = (#{i : w.x_i + c > 0} + #{i : w.y_i + c <= 0}) / 2N

the training accuracy, on all 2N (normalised) points, of a concrete linear classifier with intercept
("image" when w.u + c > 0; scores in float64). What is reported:

* **1.0 exactly when the two sets are linearly separable.** Separable <=> the convex hulls are disjoint
  (finite sets) <=> the linear programme  x_i.w + c >= 1, y_i.w + c <= -1  is feasible. A separating
  classifier is found (and then verified by counting) by, in order of cost: the centroid direction, an
  L-BFGS fit of the squared hinge loss (an L2-SVM), the feasibility LP above (HiGHS; scale-free, so
  margins of 1e-8 are found), and the L1 distance LP between the hulls (HiGHS dual simplex, d + 2 rows;
  its dual is a separating direction). Each LP has a time limit (_LP_SECONDS).
* **Below 1.0 only with a certificate that the sets are not separable**: convex weights lambda, mu with
  ||sum lambda_i x_i - sum mu_j y_j||_inf <= tol (the hulls meet; tol = 8 sqrt(d) eps of the features'
  dtype: within the data's own rounding), checked in float64 -- or HiGHS proving the feasibility LP
  infeasible. If HiGHS decides neither within its time limits: the candidates' best with a RuntimeWarning. The value is then the best accuracy of the candidate classifiers (the fits above, the LP
  direction, the top principal axes of each modality; every one with its exactly optimal threshold):
  a lower bound on the best linear accuracy, whose exact value is NP-hard to compute. On XOR-like sets
  the principal axes give the "cut off one cluster" line (~3/4).

The LPs need scipy (the ``research`` extra). Without it, when no cheap classifier separates the sets,
the candidates' best accuracy is returned with a RuntimeWarning saying it is uncertified. Cost: the
cheap classifiers are a few hundred (N x d) products; the LPs run only when they fail, first on a subset
of at most 2 d pairs (a non-separable subset certifies the whole set), so non-separable sets usually cost
one LP of that size. Deterministic for a given machine.

>>> import torch
>>> x = torch.tensor([[1.0, 0.1], [1.0, -0.1]]); y = -x
>>> linear_separability(x, y)
1.0
>>> linear_separability(x, x)  # identical sets: one of each pair is always misclassified
0.5
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from open_clip_sigrel.extras import require
from open_clip_sigrel.metrics.functional import pair_statistics
from open_clip_sigrel.metrics.inputs import prepare_features

__all__ = ["linear_separability", "Separability", "separability"]

_SUBSET_PER_DIM = 2  # pairs of the subset LP per dimension (2 x 2 d points in d + 1 parameters: rarely separable)
_PRINCIPAL_AXES = 2  # top principal axes of each modality tried as directions
_LP_SECONDS = 120.0  # HiGHS time limit per LP (never reached on the sets of the tests and benchmarks)


@dataclass(frozen=True)
class Separability:
    """accuracy of the classifier (w, c) on the 2N points; separable: True / False (certified) / None
    (uncertified: scipy missing); how: which method decided."""

    accuracy: float
    w: np.ndarray
    c: float
    separable: bool | None
    how: str


def linear_separability(image_features: Any, text_features: Any, *, max_iter: int = 300,
                        means: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """The accuracy above: 1.0 iff the modalities are linearly separable (see the module docstring).

    means: the modality centroids (float64) when the caller has them already (geometry_metrics'
    pair statistics): no second pass over the features.
    """
    return separability(image_features, text_features, max_iter=max_iter, means=means).accuracy


def separability(image_features: Any, text_features: Any, *, max_iter: int = 300,
                 means: tuple[torch.Tensor, torch.Tensor] | None = None) -> Separability:
    """``linear_separability`` with its classifier and its certificate."""
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    x, y = prepare_features(image_features, text_features)
    if means is None:
        stats = pair_statistics(x, y)
        means = stats.sum_x / stats.n, stats.sum_y / stats.n
    tol = 8 * math.sqrt(x.shape[1]) * torch.finfo(x.dtype).eps
    mx, my = (m.detach().to(torch.float64).cpu().numpy() for m in means)
    with torch.inference_mode(False):  # callers (open_clip's evaluate) may run under inference_mode
        x64 = x.detach().to(torch.float64).cpu().numpy()
        y64 = y.detach().to(torch.float64).cpu().numpy()
        return _decide(x.clone(), y.clone(), x64, y64, mx, my, max_iter, tol)  # clones: autograd-able


# ----------------------------------------------------------------------------------------------
# Classifiers and their exact best threshold
# ----------------------------------------------------------------------------------------------
def _best_threshold(sx: np.ndarray, sy: np.ndarray) -> tuple[float, float]:
    """(accuracy, c) maximising #{sx + c > 0} + #{sy + c <= 0} over c (every distinct cut is tried)."""
    n = sx.size
    sxs, sys_ = np.sort(sx), np.sort(sy)
    lowest = min(float(sxs[0]), float(sys_[0])) - 1.0  # below every score: all "image", n correct
    cuts = np.concatenate([[lowest], sxs, sys_])  # classify "image" iff score > cut
    correct = (n - np.searchsorted(sxs, cuts, side="right")) + np.searchsorted(sys_, cuts, side="right")
    k = int(np.argmax(correct))
    cut = float(cuts[k])
    above = np.concatenate([sxs[np.searchsorted(sxs, cut, side="right"):][:1],
                            sys_[np.searchsorted(sys_, cut, side="right"):][:1]])
    if above.size:  # mid-way to the next score: no point sits on the cut, so rounding flips none
        mid = cut / 2 + float(above.min()) / 2
        cut = mid if cut <= mid < above.min() else cut
    return float(correct[k]) / (2 * n), -cut


class _Best:
    """The best classifier seen so far (accuracy, w, c)."""

    def __init__(self, x64: np.ndarray, y64: np.ndarray):
        self.x64, self.y64 = x64, y64
        self.accuracy, self.w, self.c, self.how = -1.0, np.zeros(x64.shape[1]), 0.0, ""

    def offer(self, w: np.ndarray | None, how: str) -> bool:
        """Try direction w (and -w) with its best threshold; True once a classifier separates."""
        if w is None or not np.all(np.isfinite(w)) or not np.any(w):
            return self.accuracy == 1.0
        sx, sy = self.x64 @ w, self.y64 @ w
        for sign in (1.0, -1.0):
            acc, c = _best_threshold(sign * sx, sign * sy)
            if acc > self.accuracy:
                self.accuracy, self.w, self.c, self.how = acc, sign * w, c, how
        return self.accuracy == 1.0

    def result(self, separable: bool | None, how: str | None = None) -> Separability:
        return Separability(self.accuracy, self.w, self.c, separable, how or self.how)


def _lbfgs(x: torch.Tensor, y: torch.Tensor, w0: np.ndarray, c0: float, iters: int, loss_name: str) -> np.ndarray:
    """Full-batch L-BFGS on the unregularised squared hinge (min 0 on separable sets) or logistic loss."""
    w = torch.tensor(w0, dtype=x.dtype, device=x.device).requires_grad_(True)
    c = torch.tensor([c0], dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
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
    return w.detach().to(torch.float64).cpu().numpy()


def _principal_axes(a: np.ndarray, k: int) -> list[np.ndarray]:
    """The top k principal axes of the rows of a (float64 covariance, eigh)."""
    centred = a - a.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    return [vecs[:, -1 - i] for i in range(min(k, a.shape[1]))]


# ----------------------------------------------------------------------------------------------
# The LPs (scipy's HiGHS)
# ----------------------------------------------------------------------------------------------
def _hull_distance_lp(x64: np.ndarray, y64: np.ndarray, linprog, sparse):
    """min ||X^T lam - Y^T mu||_1 over the two simplices (d + 2 rows); 0 iff the hulls meet.

    Returns (value, lam, mu, w) with w the dual of the d residual rows (a separating direction when
    value > 0), or None when HiGHS gives no solution.
    """
    n, d = x64.shape
    k = y64.shape[0]
    eye = sparse.identity(d, format="csc")
    a_eq = sparse.vstack([
        sparse.hstack([sparse.csc_matrix(x64.T), sparse.csc_matrix(-y64.T), eye, -eye]),
        sparse.hstack([sparse.csc_matrix(np.ones((1, n))), sparse.csc_matrix((1, k + 2 * d))]),
        sparse.hstack([sparse.csc_matrix((1, n)), sparse.csc_matrix(np.ones((1, k))), sparse.csc_matrix((1, 2 * d))]),
    ]).tocsc()
    b_eq = np.concatenate([np.zeros(d), [1.0, 1.0]])
    cost = np.concatenate([np.zeros(n + k), np.ones(2 * d)])
    r = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs-ds",
                options={"time_limit": _LP_SECONDS})
    if r.status != 0:
        return None
    marg = getattr(getattr(r, "eqlin", None), "marginals", None)
    w = None if marg is None else np.asarray(marg[:d], dtype=np.float64)
    return float(r.fun), r.x[:n], r.x[n:n + k], w


def _hulls_meet(x64: np.ndarray, y64: np.ndarray, lam: np.ndarray, mu: np.ndarray, tol: float) -> bool:
    """The certificate: lam, mu >= 0 summing to 1 each, with ||lam X - mu Y||_inf <= tol (float64)."""
    lam, mu = np.clip(lam, 0.0, None), np.clip(mu, 0.0, None)
    if lam.sum() <= 0 or mu.sum() <= 0:
        return False
    lam, mu = lam / lam.sum(), mu / mu.sum()
    return float(np.max(np.abs(lam @ x64 - mu @ y64))) <= tol


def _feasibility_lp(x64: np.ndarray, y64: np.ndarray, linprog):
    """x.w + c >= 1, y.w + c <= -1: (status, w) with status 0 feasible, 2 infeasible (HiGHS)."""
    n, d = x64.shape
    a_ub = np.vstack([np.hstack([-x64, -np.ones((n, 1))]), np.hstack([y64, np.ones((y64.shape[0], 1))])])
    r = linprog(np.zeros(d + 1), A_ub=a_ub, b_ub=-np.ones(a_ub.shape[0]), bounds=[(None, None)] * (d + 1),
                method="highs", options={"time_limit": _LP_SECONDS})
    return r.status, (r.x[:d] if r.status == 0 else None)


# ----------------------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------------------
def _decide(x: torch.Tensor, y: torch.Tensor, x64: np.ndarray, y64: np.ndarray, mx: np.ndarray, my: np.ndarray,
            max_iter: int, tol: float) -> Separability:
    best = _Best(x64, y64)
    w0 = mx - my
    if best.offer(w0, "centroid direction"):
        return best.result(True)
    nn2 = float(w0 @ w0)
    w_init, c_init = (w0 * (4.0 / nn2), -float(w0 @ (mx + my)) * 2.0 / nn2) if nn2 > 0 else (w0, 0.0)
    if max_iter and best.offer(_lbfgs(x, y, w_init, c_init, max_iter, "squared_hinge"), "L-BFGS squared hinge"):
        return best.result(True)
    try:
        linprog = require("scipy.optimize", "research").linprog
        sparse = require("scipy.sparse", "research")
    except ImportError as e:
        return _uncertified(best, x, y, w_init, c_init, max_iter, str(e))

    n, d = x64.shape
    certified = None  # how non-separability was shown
    if n > _SUBSET_PER_DIM * d:  # a non-separable subset proves the whole set non-separable, cheaply
        idx = np.random.default_rng(0).choice(n, _SUBSET_PER_DIM * d, replace=False)
        sub = _hull_distance_lp(x64[idx], y64[idx], linprog, sparse)
        if sub is not None and _hulls_meet(x64[idx], y64[idx], sub[1], sub[2], tol):
            certified = f"the hulls of {idx.size} of the pairs meet (LP)"
            best.offer(sub[3], "hull LP dual (subset)")
    if certified is None:  # scale-free: a separator of any margin has constraint values +-1
        status, w = _feasibility_lp(x64, y64, linprog)
        if status == 0 and best.offer(w, "feasibility LP"):
            return best.result(True)
        if status == 2:
            certified = "the feasibility LP is infeasible (HiGHS)"
    if certified is None:  # HiGHS undecided within its time limit: the hull LP's certificate
        full = _hull_distance_lp(x64, y64, linprog, sparse)
        if full is not None:
            if best.offer(full[3], "hull LP dual"):
                return best.result(True)
            if _hulls_meet(x64, y64, full[1], full[2], tol):
                certified = "the hulls meet (LP)"
    if certified is None:
        return _uncertified(best, x, y, w_init, c_init, max_iter, f"HiGHS did not decide within {_LP_SECONDS:g} s")
    _lower_bound_candidates(best, x, y, x64, y64, w_init, c_init, max_iter)
    return best.result(False, f"not separable: {certified}; accuracy of the best classifier found ({best.how})")


def _lower_bound_candidates(best: _Best, x, y, x64, y64, w_init, c_init, max_iter: int) -> None:
    """More classifiers for a non-separable set: a logistic fit and each modality's principal axes."""
    if max_iter // 3:
        best.offer(_lbfgs(x, y, w_init, c_init, max_iter // 3, "logistic"), "L-BFGS logistic")
    for name, a in (("image", x64), ("text", y64)):
        for i, axis in enumerate(_principal_axes(a, _PRINCIPAL_AXES)):
            best.offer(axis, f"principal axis {i + 1} of the {name} features")


def _uncertified(best: _Best, x, y, w_init, c_init, max_iter: int, why: str) -> Separability:
    x64, y64 = best.x64, best.y64
    _lower_bound_candidates(best, x, y, x64, y64, w_init, c_init, max_iter)
    if best.accuracy == 1.0:
        return best.result(True)
    warnings.warn(f"linear_separability: not certified ({why}); {best.accuracy:.4f} is the best classifier found, "
                  "a lower bound, and the sets may still be separable", RuntimeWarning, stacklevel=3)
    return best.result(None, "uncertified: " + best.how)
