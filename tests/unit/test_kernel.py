"""The one pair-sum kernel: value and dloss/dlogits against float64 direct formulas, and every loss built on it."""
import math

import pytest
import torch
import torch.nn.functional as F

from open_clip_sigrel.loss import batched_sigrel_loss, sigrel_loss
from open_clip_sigrel.loss.kernel import pair_terms_


def _direct(z: torch.Tensor, offset: int | None):
    """-log sigmoid(y z) summed, and its derivative in z, with y = +1 on the positives' diagonal."""
    y = -torch.ones_like(z)
    if offset is not None:
        y.diagonal(offset, dim1=-2, dim2=-1).fill_(1.0)
    zz = z.clone().requires_grad_()
    value = -F.logsigmoid(y * zz).sum((-1, -2))
    (grad,) = torch.autograd.grad(value.sum(), zz)
    return value.detach(), grad


@pytest.mark.parametrize("shape, offset", [((5, 7), 0), ((5, 7), 2), ((4, 6), None), ((3, 5, 5), 0)])
def test_value_and_gradient_match_the_direct_formula(shape, offset):
    z = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 8
    value, grad = _direct(z, offset)
    g = z.clone()
    total = pair_terms_(g, offset, grad=True)
    assert total.shape == shape[:-2]
    torch.testing.assert_close(total, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, grad, rtol=1e-12, atol=1e-15)


def test_confident_positives_keep_their_gradient_in_float32():
    # sigmoid(z) - 1 is exactly 0 in float32 once z > ~17; -sigmoid(-z) is not
    z = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    total = pair_terms_(z, 0, grad=True)
    assert z[0, 0] < 0 and math.isclose(-z[0, 0].item(), math.exp(-30), rel_tol=1e-5)
    assert total > 0


def test_value_false_skips_the_value_but_not_the_gradient():
    z = torch.randn(4, 4, dtype=torch.float64)
    _, grad = _direct(z, 0)
    g = z.clone()
    assert pair_terms_(g, 0, grad=True, value=False) == 0
    torch.testing.assert_close(g, grad)


def test_float64_sums_of_float32_blocks():
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    total = pair_terms_(z.clone(), 0, sum_dtype=torch.float64)
    assert total.dtype == torch.float64
    value, _ = _direct(z.double(), 0)
    assert abs(total.item() - value.item()) < 1e-3


def test_blockwise_batched_and_dense_losses_agree():
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(2, 9, 4, dtype=torch.float64, generator=gen), dim=-1)
    y = F.normalize(torch.randn(2, 9, 4, dtype=torch.float64, generator=gen), dim=-1)
    t = torch.tensor([4.0, 20.0], dtype=torch.float64)
    b = torch.tensor([0.3, -0.1], dtype=torch.float64)
    batched = batched_sigrel_loss(x, y, t, b, normalize="batch")
    for r in range(2):
        blockwise = sigrel_loss(x[r], y[r], t[r], b[r], chunk_size=2)
        dense, _ = _direct(t[r] * (x[r] @ y[r].T - b[r]), 0)
        torch.testing.assert_close(blockwise, dense / 9, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched[r], dense / 9, rtol=1e-12, atol=1e-12)
