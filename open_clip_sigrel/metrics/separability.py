"""Linear separability of the two modalities (Bangachev et al. 2025, Thm 3.6).

    linear_separability = max over the classifiers below of  (#{i : w.x_i + c > 0} + #{i : w.y_i + c <= 0}) / 2N

the best training accuracy, on all 2N points (no subsampling; the features' float dtype), of three
linear classifiers with intercept ("image" when w.u + c > 0):

1. the centroid classifier w = mean x - mean y, c at the midpoint of the class means;
2. full-batch L-BFGS (at most 300 iterations) on the unregularised squared hinge loss (an L2-SVM: its
   minimum is 0, hence accuracy 1, on every linearly separable set), started from 1.;
3. L-BFGS (at most 100 iterations) on the unregularised logistic loss, started from 1.

Stops early at accuracy 1. Deterministic for a given machine. On non-separable sets it is a lower
bound on the best linear accuracy (computing that exactly is NP-hard). It costs up to ~400 x 4 (N x d)
products, so the training hook leaves it out unless asked (``--sigrel-geometry full``).

>>> import torch
>>> x = torch.tensor([[1.0, 0.1], [1.0, -0.1]]); y = -x
>>> linear_separability(x, y)
1.0
>>> linear_separability(x, x)  # identical sets: one of each pair is always misclassified
0.5
"""
from __future__ import annotations

from typing import Any

import torch

from open_clip_sigrel.metrics.functional import pair_statistics
from open_clip_sigrel.metrics.inputs import prepare_features

__all__ = ["linear_separability"]


def linear_separability(image_features: Any, text_features: Any, *, max_iter: int = 300,
                        means: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Best training accuracy of the linear classifiers above on the 2N (normalised) points.

    means: the modality centroids (float64) when the caller has them already (geometry_metrics'
    pair statistics): no second pass over the features.
    """
    x, y = prepare_features(image_features, text_features)
    if means is None:
        stats = pair_statistics(x, y)
        means = stats.sum_x / stats.n, stats.sum_y / stats.n
    mx, my = means
    with torch.inference_mode(False):  # callers (open_clip's evaluate) may run under inference_mode
        return _fit_separability(x.clone(), y.clone(), mx.clone(), my.clone(), max_iter)


def _fit_separability(x: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, my: torch.Tensor,
                      max_iter: int) -> float:
    n = x.shape[0]
    dtype = x.dtype

    def accuracy(w: torch.Tensor, c: torch.Tensor) -> float:
        if not (torch.isfinite(w).all() and torch.isfinite(c).all()):
            return 0.0
        correct = int(torch.count_nonzero(x @ w + c > 0)) + int(torch.count_nonzero(y @ w + c <= 0))
        return correct / (2 * n)

    w0 = mx - my
    nn2 = float(w0 @ w0)
    c0 = 0.0
    if nn2 > 0:
        w0 = w0 * (4.0 / nn2)  # class means at logits +-2
        c0 = -float(w0 @ (mx + my)) / 2
    w0 = w0.to(dtype)
    best = accuracy(w0, torch.tensor([c0], dtype=dtype, device=x.device))
    for loss_name, iters in (("squared_hinge", max_iter), ("logistic", max_iter // 3)):
        if best == 1.0:
            break
        w = w0.clone().requires_grad_(True)
        c = torch.tensor([c0], dtype=dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, c], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-10,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure(w=w, c=c, opt=opt, loss_name=loss_name):
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
        best = max(best, accuracy(w.detach(), c.detach()))
    return best


