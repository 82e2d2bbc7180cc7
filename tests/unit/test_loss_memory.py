"""What the loss keeps for backward (no B x B or chunk x B tensor), and blockwise == direct formula.

The memory claim is checked structurally, not by timing or RSS: every tensor autograd saves during
the forward pass is recorded through torch.autograd.graph.saved_tensors_hooks. open_clip's
SigLipLoss serves as the control, showing that the hook really sees a saved B x B tensor.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_sigrel.loss import SigRelLoss, sigrel_loss

N, DIM, CHUNK = 512, 16, 64


def _features(n: int, d: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x.to(dtype), y.to(dtype)


def _saved_numels(forward) -> list[int]:
    """numel of every tensor saved for backward while ``forward()`` runs (and runs backward after)."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.backward()  # the recorded graph is usable
    return sizes


def _inputs(dtype=torch.float32):
    x, y = _features(N, DIM, dtype)
    return (x.requires_grad_(), y.requires_grad_(),
            torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(1.0, requires_grad=True))


def _sigrel_fn(x, y, log_t, b):
    return sigrel_loss(x, y, log_t.exp(), b, chunk_size=CHUNK)


def _module_fn(x, y, log_t, b):
    t = log_t.exp()
    return SigRelLoss(chunk_size=CHUNK)(x, y, logit_scale=t, logit_bias=-t * b)


@pytest.mark.parametrize("forward", [_sigrel_fn, _module_fn], ids=["sigrel_loss", "SigRelLoss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nothing_quadratic_is_saved_for_backward(forward, dtype):
    x, y, log_t, b = _inputs(dtype)
    sizes = _saved_numels(lambda: forward(x, y, log_t, b))
    assert sizes, "the hook saw nothing: the test would not detect a saved B x B tensor"
    assert max(sizes) < N * N // 4, f"a saved tensor has {max(sizes)} elements (B^2 = {N * N})"
    # Stricter: nothing larger than the features (B x d); a chunk x B block (64 x 512) would be.
    assert max(sizes) <= N * DIM, f"a saved tensor has {max(sizes)} elements, more than B x d = {N * DIM}"
    assert x.grad is not None and y.grad is not None and log_t.grad is not None and b.grad is not None


def test_control_open_clip_siglip_saves_a_quadratic_tensor():
    x, y, log_t, b = _inputs()
    sizes = _saved_numels(lambda: SigLipLoss()(x, y, log_t.exp(), -log_t.exp() * b))
    assert max(sizes) >= N * N


def _direct(x, y, t, b, normalize: str, negatives_only: bool = False) -> torch.Tensor:
    """-log sigmoid(label * t (s - b)) over all pairs, as a B x B matrix (the definition)."""
    n, m = x.shape[0], y.shape[0]
    labels = -torch.ones(n, m, dtype=x.dtype)
    if not negatives_only:
        labels += 2 * torch.eye(n, m, dtype=x.dtype)
    total = -F.logsigmoid(labels * t * (x @ y.T - b)).sum()
    return total / {"batch": n, "pairs": n * m, "sum": 1}[normalize]


def _loss_and_grads(fn, x, y, log_t, b) -> list[torch.Tensor]:
    leaves = [v.detach().clone().requires_grad_() for v in (x, y, log_t, b)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [v.grad for v in leaves]


@pytest.mark.parametrize("negatives_only", [False, True])
@pytest.mark.parametrize("normalize", ["batch", "pairs", "sum"])
@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
def test_blockwise_equals_direct_float64(normalize, negatives_only, chunk):
    """B = 37 with chunks that do not divide it (and the edge cases 1, B - 1, B, > B)."""
    x, y = _features(37, 6, torch.float64, seed=1)
    y[:20] = F.normalize(y[:20] + 3 * x[:20], dim=-1)  # positive and negative logits both occur
    log_t = torch.tensor(math.log(12.0), dtype=torch.float64)
    b = torch.tensor(0.25, dtype=torch.float64)

    def ours(x, y, log_t, b):
        return sigrel_loss(x, y, log_t.exp(), b, normalize=normalize, negatives_only=negatives_only,
                           chunk_size=chunk)

    def direct(x, y, log_t, b):
        return _direct(x, y, log_t.exp(), b, normalize, negatives_only)

    got, want = _loss_and_grads(ours, x, y, log_t, b), _loss_and_grads(direct, x, y, log_t, b)
    for name, g, w in zip(("loss", "x", "y", "log_t", "b_rel"), got, want):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13, msg=name)


def test_rectangular_negatives_only_block_equals_direct():
    """A text block from another rank may differ in size from the local images."""
    x, _ = _features(11, 5, torch.float64, seed=2)
    _, y = _features(7, 5, torch.float64, seed=3)
    log_t, b = torch.tensor(math.log(9.0), dtype=torch.float64), torch.tensor(-0.1, dtype=torch.float64)
    got = _loss_and_grads(lambda *a: sigrel_loss(a[0], a[1], a[2].exp(), a[3], normalize="sum",
                                                 negatives_only=True, chunk_size=3), x, y, log_t, b)
    want = _loss_and_grads(lambda *a: _direct(a[0], a[1], a[2].exp(), a[3], "sum", True), x, y, log_t, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


def test_bf16_inputs_give_float32_loss_close_to_float64():
    x, y = _features(64, 32, torch.float64, seed=4)
    ref = _loss_and_grads(lambda *a: _direct(a[0], a[1], a[2].exp(), a[3], "batch"),
                          x, y, torch.tensor(math.log(10.0), dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64))
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    log_t, b = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(1.0, requires_grad=True)
    loss = sigrel_loss(xb, yb, log_t.exp(), b, chunk_size=10)
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and log_t.grad.dtype == torch.float32
    # bf16 rounds the features (8 bits of mantissa); the sums themselves run in float32
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(xb.grad.double(), ref[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(log_t.grad.double(), ref[3], rtol=5e-2, atol=1e-2)
    torch.testing.assert_close(b.grad.double(), ref[4], rtol=5e-2, atol=1e-2)
