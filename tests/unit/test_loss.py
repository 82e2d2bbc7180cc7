"""sigrel_loss / SigRelLoss against open_clip's SigLipLoss and a direct float64 formula."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_sigrel import SigRelLoss, sigrel_loss


def _pairs(n=9, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def _direct(x, y, t, b):
    """-log sigmoid(y_ij * t (s_ij - b)) summed over all pairs, labels +1 on the diagonal."""
    labels = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    return -F.logsigmoid(labels * t * (x @ y.T - b)).sum()


@pytest.mark.parametrize("normalize,scale", [("batch", lambda n: n), ("pairs", lambda n: n * n), ("sum", lambda n: 1)])
@pytest.mark.parametrize("t,b", [(10.0, 1.0), (117.8, 0.11), (3.0, -0.4)])
def test_equals_open_clip_siglip_with_logit_bias_minus_t_b(normalize, scale, t, b):
    x, y = _pairs()
    n = x.shape[0]
    t_ = torch.tensor(t, dtype=torch.float64)
    ours = sigrel_loss(x, y, t_, b, normalize=normalize, chunk_size=4)
    siglip = SigLipLoss()(x, y, t_, torch.tensor(-t * b, dtype=torch.float64))  # open_clip: sum / B
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours * scale(n), siglip * n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours * scale(n), _direct(x, y, t_, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalize", ["batch", "pairs", "sum"])
@pytest.mark.parametrize("negatives_only", [False, True])
def test_gradcheck_features_log_t_and_rel_bias(normalize, negatives_only):
    x, y = _pairs(n=7, d=5, seed=1)
    x.requires_grad_()
    y.requires_grad_()
    log_t = torch.tensor(math.log(4.0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def f(x, y, log_t, b):
        return sigrel_loss(x, y, log_t.exp(), b, normalize=normalize, negatives_only=negatives_only, chunk_size=3)

    assert torch.autograd.gradcheck(f, (x, y, log_t, b))


def test_gradients_match_siglip_through_logit_bias():
    """Training a relative bias: same logits, grads reach b_rel through logit_bias = -t * b_rel."""
    x, y = _pairs(n=8, d=4, seed=2)
    log_t = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    SigRelLoss()(x, y, log_t.exp(), -log_t.exp() * b).backward()
    g_ours = (log_t.grad.clone(), b.grad.clone())
    log_t.grad = b.grad = None
    SigLipLoss()(x, y, log_t.exp(), -log_t.exp() * b).backward()
    torch.testing.assert_close(g_ours, (log_t.grad, b.grad), rtol=1e-12, atol=1e-12)


def test_stable_for_confident_mistakes():
    """No log(sigmoid + eps) cap: a confidently wrong pair keeps its full loss and gradient."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = sigrel_loss(x, y, 1000.0, 0.0, normalize="sum")
    assert math.isfinite(loss.item()) and loss.item() > 3000  # 4 terms of softplus(1000)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().max() > 100


def test_bf16_inputs_accumulate_in_float32():
    x, y = _pairs(n=16, d=8, seed=3)
    ref = sigrel_loss(x, y, 10.0, 1.0)
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    out = sigrel_loss(xb, yb, torch.tensor(10.0), torch.tensor(1.0))
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) / ref.item() < 2e-2
    out.backward()
    assert xb.grad.dtype == torch.bfloat16


def test_under_autocast_loss_is_float32():
    x, y = _pairs(n=8, d=4, seed=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sigrel_loss(x, y, 10.0, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sigrel_loss(x, y, 10.0, 1.0))


@pytest.mark.parametrize(
    "x_shape,y_shape,message",
    [((4, 3), (5, 3), "equal batch sizes"), ((4, 3), (4, 2), "dimensions differ"), ((4,), (4,), "2-D")],
)
def test_shape_errors_name_the_problem(x_shape, y_shape, message):
    with pytest.raises(ValueError, match=message):
        sigrel_loss(torch.randn(*x_shape), torch.randn(*y_shape), 10.0, 1.0)


def test_argument_errors():
    x, y = _pairs(n=4, d=3)
    with pytest.raises(ValueError, match="normalize"):
        sigrel_loss(x, y, 10.0, 1.0, normalize="mean")
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        sigrel_loss(x, y, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        sigrel_loss(x, y, 10.0, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="dist_impl"):
        SigRelLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="logit_bias"):
        SigRelLoss()(x, y, torch.tensor(10.0), None)


def test_module_output_dict_like_siglip():
    x, y = _pairs(n=5, d=3, dtype=torch.float32)
    out = SigRelLoss()(x, y, torch.tensor(10.0), torch.tensor(-10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], SigLipLoss()(x, y, torch.tensor(10.0), torch.tensor(-10.0)))


def test_float32_keeps_precision_near_zero_loss():
    """Positives are summed as softplus(-z_ii), not softplus(z_ii) - z_ii: no cancellation in float32."""
    x = torch.eye(8, dtype=torch.float64)
    ref = _direct(x, x, torch.tensor(30.0, dtype=torch.float64), 0.5)  # every logit is +-15: ~2e-5 in all
    b = torch.tensor(0.5, requires_grad=True)
    ours = sigrel_loss(x.float(), x.float(), 30.0, b, normalize="sum")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    # dL/db = -t (sum_neg sigmoid(z) - sum_pos sigmoid(-z)) = -30 * (56 - 8) * sigmoid(-15), not rounded to 0
    assert b.grad.item() == pytest.approx(-30 * 48 * torch.sigmoid(torch.tensor(-15.0)).item(), rel=1e-4)


@pytest.mark.parametrize("negatives_only", [False, True])
def test_empty_batch_is_a_clear_error_not_nan(negatives_only):
    """B = 0 used to return 0 / 0 = NaN; now a ValueError naming the empty batch, before any work."""
    x, y = _pairs()
    empty = x[:0]
    for a, b in ((empty, empty), (empty, y), (x, empty)):
        if not negatives_only and a.shape[0] != b.shape[0]:
            continue  # unequal paired batches fail the pairing check instead
        with pytest.raises(ValueError, match="empty batch"):
            sigrel_loss(a, b, 10.0, 0.1, negatives_only=negatives_only)
