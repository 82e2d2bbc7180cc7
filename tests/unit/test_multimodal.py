"""multimodal_sigrel_loss: k = 2 is sigrel_loss; k > 2 is the edge average of a dense formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from open_clip_sigrel.loss import multimodal_sigrel_loss, sigrel_loss


def _features(k: int, n: int = 6, d: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1) for _ in range(k)]


def _dense_pair(x: torch.Tensor, y: torch.Tensor, t: float, b: float, normalize: str) -> torch.Tensor:
    """sum_ij -logsigmoid(y_ij * t * (s_ij - b)), y_ii = +1, y_ij = -1, normalised."""
    n = x.shape[0]
    labels = 2 * torch.eye(n, dtype=x.dtype) - 1
    total = -F.logsigmoid(labels * t * (x @ y.T - b)).sum()
    return total / {"batch": n, "pairs": n * n, "sum": 1}[normalize]


@pytest.mark.parametrize("normalize", ["batch", "pairs", "sum"])
def test_two_modalities_equal_sigrel_loss(normalize: str) -> None:
    x, y = _features(2)
    for graph in ("complete", "star"):
        got = multimodal_sigrel_loss([x, y], 7.0, 0.3, graph=graph, normalize=normalize)
        want = sigrel_loss(x, y, 7.0, 0.3, normalize=normalize)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("graph", ["complete", "star"])
@pytest.mark.parametrize("normalize", ["batch", "pairs"])
def test_four_modalities_match_double_loop(graph: str, normalize: str) -> None:
    feats = _features(4, seed=1)
    t, b = 5.0, -0.2
    k = len(feats)
    total, edges = torch.zeros((), dtype=torch.float64), 0
    for a in range(k):
        for c in range(a + 1, k):
            if graph == "star" and a != 0:
                continue
            total = total + _dense_pair(feats[a], feats[c], t, b, normalize)
            edges += 1
    assert edges == (6 if graph == "complete" else 3)
    got = multimodal_sigrel_loss(feats, t, b, graph=graph, normalize=normalize)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, total / edges, rtol=1e-10, atol=1e-12)


def test_gradients_match_dense_formula() -> None:
    feats = [f.requires_grad_() for f in _features(3, seed=2)]
    t = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(multimodal_sigrel_loss(feats, t, b, normalize="pairs"), [*feats, t, b])
    dense = sum(_dense_pair(feats[a], feats[c], t, b, "pairs") for a, c in [(0, 1), (0, 2), (1, 2)]) / 3
    want = torch.autograd.grad(dense, [*feats, t, b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_bad_graph_and_too_few_modalities() -> None:
    x, y = _features(2)
    with pytest.raises(ValueError, match="graph"):
        multimodal_sigrel_loss([x, y], 1.0, 0.0, graph="ring")
    with pytest.raises(ValueError, match="at least 2"):
        multimodal_sigrel_loss([x], 1.0, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        multimodal_sigrel_loss([], 1.0, 0.0)
