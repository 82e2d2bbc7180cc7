"""The pair-sum kernel: every sigrel loss value and gradient in the package goes through ``pair_terms_``.

For a block of logits z = t * (s - b_rel) with positives on one diagonal:

    loss terms   softplus(z_ij) for negatives,  softplus(-z_ii) for positives  (= -log sigmoid(y_ij z_ij))
    dloss / dz   G_ij = sigmoid(z_ij),           G_ii = -sigmoid(-z_ii)

Positives are written as softplus(-z) and -sigmoid(-z), not softplus(z) - z and sigmoid(z) - 1: no
cancellation, so confident positives keep their (small) loss and gradient in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one row block of logits (fp32: 16 MiB per temporary) ...
_CHUNK_ELEMENTS = 1 << 22
# ... but at least this many image rows: the chunk is the inner dimension of the text-gradient
# GEMM (gy += P^T x), which runs well below peak with thin chunks (CPU fp32, B = 16384: 256-row
# chunks took 35 s a step, 1024-row ones 27 s), unless a block would exceed 64M elements.
_MIN_CHUNK_ROWS = 1024
_MAX_CHUNK_ELEMENTS = 1 << 26


def auto_chunk_size(n_rows: int, n_cols: int) -> int:
    """Rows per block: about 4M logits, yet at least 1024 rows while a block stays under 64M logits."""
    n_cols = max(n_cols, 1)
    rows = max(_CHUNK_ELEMENTS // n_cols, min(_MIN_CHUNK_ROWS, _MAX_CHUNK_ELEMENTS // n_cols))
    return max(1, min(n_rows, rows))


def pair_terms_(z: torch.Tensor, diag_offset: int | None = None, *, grad: bool = False, value: bool = True,
                sum_dtype: torch.dtype | None = None, parts: int = 4) -> torch.Tensor:
    """Sum of the loss terms of the logits block ``z`` (..., rows, cols); with ``grad``, z becomes G in place.

    diag_offset: the positives are z.diagonal(diag_offset) over the last two dims (pair i is row i of
    the block's images and column i + diag_offset of its texts); None: every pair is a negative.
    Leading dims are independent problems (batched runs): the sum is then per problem, shape z.shape[:-2].
    value=False skips the softplus (the slowest op of a CPU step) and returns zeros: G alone is exact.
    sum_dtype: dtype of the returned sum (e.g. float64 for float32 blocks). The softplus runs over
    ``parts`` row slices, so its temporary is a fraction of the block. z is consumed either way.

    >>> z = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    >>> total = pair_terms_(z.clone(), 0)
    >>> bool(torch.isclose(total, F.softplus(-z.diagonal()).sum() + F.softplus(z[[0, 1], [1, 0]]).sum()))
    True
    """
    # softplus(z) is returned as z above the threshold: exact to rounding when exp(-threshold) < eps
    threshold = 40.0 if z.dtype == torch.float64 else 20.0
    batch_shape = z.shape[:-2]
    total = torch.zeros(batch_shape, dtype=sum_dtype or z.dtype, device=z.device)
    g_pos = None
    if diag_offset is not None:
        zd = z.diagonal(diag_offset, dim1=-2, dim2=-1)
        if value:
            total += F.softplus(-zd, threshold=threshold).sum(-1, dtype=total.dtype)
        if grad:
            g_pos = torch.sigmoid(-zd).neg_()
        zd.fill_(-math.inf)  # softplus and sigmoid of -inf are 0: positives leave the negative sums
    if value:
        step = max(1, -(-z.shape[-2] // max(1, parts)))
        for lo in range(0, z.shape[-2], step):
            total += F.softplus(z[..., lo:lo + step, :], threshold=threshold).sum((-1, -2), dtype=total.dtype)
    if grad:
        z.sigmoid_()
        if g_pos is not None:
            z.diagonal(diag_offset, dim1=-2, dim2=-1).copy_(g_pos)
    return total


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 inputs accumulate in fp32); float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _pair_block(x, y, t, b, chunk_size: int, *, py=None, py_overwrite=False, gy=None, want_p_sum=False,
                diag=False):
    """One block of pairs (rows of x against rows of y), in row chunks of x; plain tensors, no autograd.

    Returns (loss sum, sum_ij G_ij) where G = dloss/dz: sigmoid(z_ij) for negatives and, with ``diag``
    (pair i is row i of both), sigmoid(z_ii) - 1 = -sigmoid(-z_ii) for positives; z = t (x y^T - b).
    Adds G y to ``py`` (or writes it, ``py_overwrite``) and G^T x to ``gy``, both unscaled by t.
    Memory: one chunk x m block of logits and a quarter of it for softplus.
    """
    total, p_sum = x.new_zeros(()), x.new_zeros(())
    grad = py is not None or gy is not None or want_p_sum
    for lo in range(0, x.shape[0], chunk_size):
        xc = x[lo:lo + chunk_size]
        z = torch.mm(xc, y.T).sub_(b).mul_(t)  # t * (S - b), the only block-wide buffer
        total += pair_terms_(z, lo if diag else None, grad=grad)  # positives (i, lo + i); z becomes G
        if not grad:
            continue
        if want_p_sum:
            p_sum += z.sum()
        if py is not None:
            if py_overwrite:
                torch.mm(z, y, out=py[lo:lo + chunk_size])
            else:
                py[lo:lo + chunk_size].addmm_(z, y)
        if gy is not None:
            gy.addmm_(z.T, xc)
    return total, p_sum


def _finish(x, t, b, p_sum, py, gy, need_t: bool):
    """Gradients from the block sums (see _SoftplusPairSum); scales py / gy in place.

    dL/dt = sum G (S - b) = <x, G y> - b sum G: no B x B buffer of S - b is needed, and scaling
    by t once at the end (instead of G *= t per block) saves a pass over every block.
    """
    gt = torch.dot(x.reshape(-1), py.reshape(-1)) - b * p_sum if need_t else x.new_zeros(())
    gb = -t * p_sum
    gx = None if py is None else py.mul_(t)
    if gy is not None:
        gy = gy.mul_(t)
    return gx, gy, gt, gb


def _prepare(x, y, t, b):
    acc = _accumulation_dtype(x, y)
    return x.to(acc), y.to(acc), t.detach().to(acc).reshape(()), b.detach().to(acc).reshape(())  # no copy if acc


class _SoftplusPairSum(torch.autograd.Function):
    """sum_ij -log sigmoid(y_ij z_ij), z = t * (<x_i, y_j> - b): blockwise through pair_terms_, gradient formed in forward.

    With G = dL/dz (sigmoid(z) off the diagonal; -sigmoid(-z_ii) on it when ``positives``):
    dL/dx = t G y, dL/dy = t G^T x, dL/dt = sum G (S - b), dL/db = -t sum G.
    Only the O((n + m) d) gradients are saved.
    """

    @staticmethod
    def forward(ctx, x, y, t, b, chunk_size: int, positives: bool):
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, y32, t32, b32 = _prepare(x, y, t, b)
            py = torch.empty_like(x32) if (need_x or need_t) else None  # P y, written block by block
            gy = torch.zeros_like(y32) if need_y else None  # P^T x
            total, p_sum = _pair_block(x32, y32, t32, b32, chunk_size, py=py, py_overwrite=True, gy=gy,
                                       want_p_sum=need_t or need_b, diag=positives)
            gx, gy, gt, gb = _finish(x32, t32, b32, p_sum, py, gy, need_t)
        ctx.save_for_backward(gx if need_x else None, gy, gt.reshape(t.shape), gb.reshape(b.shape))
        ctx.dtypes = (x.dtype, y.dtype, t.dtype, b.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gy, gt, gb = ctx.saved_tensors
        dx, dy, dt, db = ctx.dtypes
        return (
            None if gx is None else (gx * grad).to(dx),
            None if gy is None else (gy * grad).to(dy),
            (gt * grad).to(dt) if ctx.needs_input_grad[2] else None,
            (gb * grad).to(db) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


class _BatchedPairSum(torch.autograd.Function):
    """R independent sigrel losses on (R, B, d) inputs, one dense (R, B, B) block each: the same kernel
    (pair_terms_) and the same gradient identities as _SoftplusPairSum, dL/dt from <x, G y> - b sum G."""

    @staticmethod
    def forward(ctx, x, y, t, b, norm: float, compute_value: bool, form: str = "exact"):
        z = torch.bmm(x, y.transpose(1, 2)).sub_(b[:, None, None]).mul_(t[:, None, None])
        value = _terms(form)(z, 0, grad=True, value=compute_value) / norm  # z becomes G
        if not compute_value:
            value.fill_(float("nan"))
        # G y and G^T x as (d, B) x (B, B) products, transposed back: ~3x faster than (B, B) x (B, d) for small d on CPU
        gy_x = torch.bmm(y.transpose(1, 2), z.transpose(1, 2)).transpose(1, 2)  # G y, also needed for dL/dt
        p_sum = z.sum((1, 2))
        gt = ((x * gy_x).sum((1, 2)) - b * p_sum) / norm
        gb = -(t * p_sum) / norm
        scale = (t / norm)[:, None, None]
        gx = gy_x.mul_(scale) if ctx.needs_input_grad[0] else None
        gy = torch.bmm(x.transpose(1, 2), z).transpose(1, 2).mul_(scale) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(gx, gy, gt, gb)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gy, gt, gb = ctx.saved_tensors
        g3 = grad[:, None, None]
        return (
            None if gx is None else gx * g3,
            None if gy is None else gy * g3,
            gt * grad if ctx.needs_input_grad[2] else None,
            gb * grad if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------------------
# The authors' clipped terms (for reproducing the paper's code only; every other loss is exact)
# ----------------------------------------------------------------------------------------------
#: the epsilon of the authors' code: -log(sigmoid(z) + eps); each term caps at -log(eps) ~ 18.42
AUTHORS_EPS = 1e-8
#: loss forms of batched_pair_loss: "exact" (pair_terms_, -log sigmoid) and "authors" (clipped_pair_terms_)
LOSS_FORMS = ("exact", "authors")


def clipped_pair_terms_(z: torch.Tensor, diag_offset: int | None = 0, *, grad: bool = False, value: bool = True,
                        eps: float = AUTHORS_EPS) -> torch.Tensor:
    """The authors' terms, summed per problem like ``pair_terms_`` (z consumed; with ``grad`` it becomes G):

        positives  -log(sigmoid(z) + eps),    G = -sigmoid(z) sigmoid(-z) / (sigmoid(z) + eps)
        negatives  -log(1 - sigmoid(z) + eps), G =  sigmoid(z) sigmoid(-z) / (sigmoid(-z) + eps)

    1 - sigmoid(z) is written sigmoid(-z) (equal in exact arithmetic; no cancellation). A badly wrong
    pair's term saturates near -log(eps) and its gradient vanishes: the cause of the paper's
    "fixed large t" and "large initial t" failures.
    """
    p = torch.sigmoid(z)  # sigmoid(z); q = sigmoid(-z) = 1 - p without cancellation
    q = torch.sigmoid(-z)
    sign = torch.ones_like(z)
    if diag_offset is not None:
        sign.diagonal(diag_offset, dim1=-2, dim2=-1).fill_(-1.0)
    right = torch.where(sign < 0, p, q)  # the probability of the correct label
    total = (-torch.log(right + eps)).sum((-1, -2)) if value else z.new_zeros(z.shape[:-2])
    if grad:
        z.copy_(p.mul_(q).div_(right + eps).mul_(sign))  # sign * p q / (right + eps); right is its own tensor
    return total


def _terms(form: str):
    if form == "exact":
        return pair_terms_
    if form == "authors":
        return clipped_pair_terms_
    raise ValueError(f"loss form must be one of {', '.join(LOSS_FORMS)}, got {form!r}")


def batched_pair_loss(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, norm: float, *,
                      compute_value: bool = True, form: str = "exact") -> torch.Tensor:
    """(R,) losses of R dense problems, x, y: (R, B, d), t, b: (R,), sum of terms / norm; ``form``: LOSS_FORMS.

    form="exact" is loss.batched_sigrel_loss's computation (the same Function, bit-identical)."""
    _terms(form)
    return _BatchedPairSum.apply(x, y, t, b, float(norm), bool(compute_value), form)
