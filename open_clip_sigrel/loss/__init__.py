"""The relative-bias sigmoid loss of Bangachev et al., "Global Minimizers of Sigmoid
Contrastive Loss" (arXiv 2509.18552).

    logits_ij = t * (<u_i, v_j> - b_rel),   y_ii = +1,  y_ij = -1 (i != j)
    loss      = sum_ij -log sigmoid(y_ij * logits_ij) / norm
              = (sum_ij softplus(logits_ij) - sum_i logits_ii) / norm

The second line (softplus(-z) = softplus(z) - z) removes the label matrix. open_clip's
SigLipLoss is the same function of the logits with ``logit_bias = -t * b_rel``; what differs
is which scalar the optimizer moves (see ``open_clip_sigrel.model``).

No B x B tensor is kept: the pair sum is computed in row blocks, and the gradient of each
block is formed in the same pass (it only needs sigmoid(logits)), so autograd saves O(B d).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from open_clip_sigrel.bias import rel_bias_from_logit_bias

NORMALIZATIONS = ("batch", "pairs", "sum")
#: open_clip's cross-rank exchange patterns (--loss-dist-impl); bidir and shift run as a ring (_RingPairSum).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
RING_DIST_IMPLS = ("bidir", "shift")
#: how k >= 2 modalities are paired: every pair (a < c), or modality 0 against each other one
GRAPHS = ("complete", "star")
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


def _pair_block(x, y, t, b, chunk_size: int, *, py=None, py_overwrite=False, gy=None, want_p_sum=False,
                diag=False):
    """One block of pairs (rows of x against rows of y), in row chunks of x; plain tensors, no autograd.

    Returns (loss sum, sum_ij G_ij) where G = dloss/dz: sigmoid(z_ij) for negatives and, with ``diag``
    (pair i is row i of both), sigmoid(z_ii) - 1 = -sigmoid(-z_ii) for positives; z = t (x y^T - b).
    Adds G y to ``py`` (or writes it, ``py_overwrite``) and G^T x to ``gy``, both unscaled by t.
    Positives are summed as softplus(-z_ii) directly, not as softplus(z_ii) - z_ii: no cancellation,
    and confident positives keep their (small) gradient in float32.
    Memory: one chunk x m block of logits and a quarter of it for softplus.
    """
    total, p_sum = x.new_zeros(()), x.new_zeros(())
    for lo in range(0, x.shape[0], chunk_size):
        xc = x[lo:lo + chunk_size]
        z = torch.mm(xc, y.T).sub_(b).mul_(t)  # t * (S - b), the only block-wide buffer
        if diag:
            zd = z.diagonal(lo)  # (i, lo + i): this chunk's positives
            total += torch.nn.functional.softplus(-zd).sum()
            g_pos = torch.sigmoid(-zd)
            zd.fill_(-math.inf)  # softplus and sigmoid of -inf are 0: positives leave the block sums
        for zp in z.split(-(-z.shape[0] // 4)):  # softplus in quarters of the block
            total += torch.nn.functional.softplus(zp).sum()
        if py is None and gy is None and not want_p_sum:
            continue
        p = z.sigmoid_()  # in place: z is no longer needed
        if diag:
            p.diagonal(lo).copy_(g_pos.neg_())
        if want_p_sum:
            p_sum += p.sum()
        if py is not None:
            if py_overwrite:
                torch.mm(p, y, out=py[lo:lo + chunk_size])
            else:
                py[lo:lo + chunk_size].addmm_(p, y)
        if gy is not None:
            gy.addmm_(p.T, xc)
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
    """sum_ij softplus(z_ij) [- sum_i z_ii], z = t * (<x_i, y_j> - b): blockwise, gradient formed in forward.

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


class _Ring:
    """Where this rank sits and how text blocks travel (open_clip's bidir or shift pattern)."""

    def __init__(self, rank: int, world_size: int, dist_impl: str, owner: SigRelLoss | None = None):
        self.rank, self.world, self.impl = rank, world_size, dist_impl
        self.owner = owner  # keeps the deferred upstream-gradient check (SigRelLoss.check_upstream_gradients)

    def peer(self, offset: int) -> int:
        return (self.rank + offset) % self.world

    def blocks(self, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
        """Yields (texts of rank + offset, offset) for every other rank; no autograd."""
        from open_clip.loss import neighbour_exchange, neighbour_exchange_bidir

        left, right = self.peer(-1), self.peer(1)
        if self.impl == "bidir":
            to_left = to_right = y
            num_bidir, remainder = divmod(self.world - 1, 2)
            for i in range(1, num_bidir + 1):
                from_right, from_left = neighbour_exchange_bidir(left, right, to_left, to_right)
                to_left = to_right = None  # let the previous blocks go
                yield from_right, i
                if i == num_bidir:
                    from_right = None  # not passed on: the remainder step sends to the right only
                yield from_left, -i
                to_left, to_right = from_right, from_left
                from_right = from_left = None
            if remainder:
                to_left = None
                received = neighbour_exchange(left, right, to_right)
                to_right = None
                yield received, -(num_bidir + 1)
        else:  # shift
            to_right = y
            for k in range(1, self.world):
                to_right = neighbour_exchange(left, right, to_right)
                yield to_right, -k


def _peer_blocks(x, y, t, b, chunk_size: int, ring: _Ring, *, py=None, gy=None, want_p_sum=False,
                 send_scale=None):
    """All pairs of this rank's images x with the other ranks' texts; returns (softplus sum, sum P).

    Adds P y to ``py``. The texts' gradient P^T x of each peer block goes back to its owner at once
    (times ``send_scale``), and what the other ranks computed for this rank's texts is added to
    ``gy``: no per-peer gradient is kept. Peer blocks run over column groups of the texts, so the
    gradient travels in slices, and the logits buffer (n x cols) holds at most n x d / 2 elements:
    the received text blocks already take B x d each, so a smaller buffer keeps a rank's peak near
    the single-rank one where a chunk of logits is large next to B x d. ``chunk_size`` still
    bounds it (at most chunk x m elements).
    """
    import torch.distributed as dist

    n, m = x.shape[0], y.shape[0]
    cols = max(1, min(x.shape[1] // 2, (chunk_size * m) // max(n, 1)))
    group_rows = max(cols, -(-m // 8))  # gradient messages: at most 8 per peer block
    total, p_sum = x.new_zeros(()), x.new_zeros(())
    for block, offset in ring.blocks(y):
        for g0 in range(0, m, group_rows):
            rows = block[g0:g0 + group_rows]
            out = torch.zeros_like(rows) if gy is not None else None  # P^T x of these texts
            for lo in range(0, rows.shape[0], cols):
                s, ps = _pair_block(x, rows[lo:lo + cols], t, b, n, py=py, want_p_sum=want_p_sum,
                                    gy=None if out is None else out[lo:lo + cols])
                total += s
                p_sum += ps
            if out is not None:
                if send_scale is not None:
                    out.mul_(send_scale)
                recv = torch.empty_like(out)
                ops = [dist.P2POp(dist.isend, out, ring.peer(offset)),
                       dist.P2POp(dist.irecv, recv, ring.peer(-offset))]
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
                gy[g0:g0 + recv.shape[0]].add_(recv)
    return total, p_sum


class _RingPairSum(torch.autograd.Function):
    """This rank's sum over its images and every rank's texts (positives on the local block).

    The texts travel without autograd (open_clip's bidir / shift exchanges) and each peer block's
    text gradient is sent back to its owner during the forward pass (_peer_blocks), so a rank keeps
    two O(B d) gradients whatever the world size; open_clip's autograd exchanges would keep every
    peer block's gradients until backward. The gradient sent ahead assumes every rank back-propagates
    its loss with the same upstream gradient (as DDP training does); backward checks that with one
    all_reduce of two numbers and otherwise recomputes the text gradients, each rank's part scaled
    by its own upstream gradient. On an accelerator the check is deferred by default (no host read
    per backward): a mismatch is counted on the device and ``SigRelLoss.check_upstream_gradients``
    raises. Every rank must call backward, as with open_clip's exchanges.
    """

    @staticmethod
    def forward(ctx, x, y, t, b, chunk_size: int, ring: _Ring):
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        want_p_sum = need_t or need_b
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, y32, t32, b32 = _prepare(x, y, t, b)
            py = torch.empty_like(x32) if (need_x or need_t) else None
            gy = torch.zeros_like(y32) if need_y else None
            total, p_sum = _pair_block(x32, y32, t32, b32, chunk_size, py=py, py_overwrite=True, gy=gy,
                                       want_p_sum=want_p_sum, diag=True)
            total_peers, p_sum_peers = _peer_blocks(x32, y32, t32, b32, chunk_size, ring, py=py, gy=gy,
                                                    want_p_sum=want_p_sum)
            total = total + total_peers
            gx, gy, gt, gb = _finish(x32, t32, b32, p_sum + p_sum_peers, py, gy, need_t)
        ctx.save_for_backward(gx if need_x else None, gy, gt.reshape(t.shape), gb.reshape(b.shape),
                              x if need_y else None, y if need_y else None, t, b)
        ctx.dtypes = (x.dtype, y.dtype, t.dtype, b.dtype)
        ctx.chunk_size, ctx.ring = chunk_size, ring
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gy, gt, gb, x, y, t, b = ctx.saved_tensors
        dx, dy, dt, db = ctx.dtypes
        if gy is not None:
            import torch.distributed as dist

            g = grad.detach().reshape(()).to(torch.float64)
            extremes = torch.stack([g, -g])
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            equal = extremes[0] == -extremes[1]
            owner = ctx.ring.owner
            if owner is not None and owner.defers_upstream_check(x.device):
                # No host read here (a device sync per micro-step on a GPU): assume the DDP case and let
                # check_upstream_gradients() fail loudly if any rank's upstream gradient differed.
                owner.note_upstream(equal)
                gy = gy * grad
            elif bool(equal):
                gy = gy * grad
            else:  # ranks scale their losses differently: recompute, each part with its sender's factor
                with torch.autocast(device_type=x.device.type, enabled=False):
                    x32, y32, t32, b32 = _prepare(x, y, t, b)
                    g32 = grad.detach().to(x32.dtype).reshape(())
                    gy = torch.zeros_like(y32)
                    _pair_block(x32, y32, t32, b32, ctx.chunk_size, gy=gy, diag=True)
                    gy.mul_(g32)
                    _peer_blocks(x32, y32, t32, b32, ctx.chunk_size, ctx.ring, gy=gy, send_scale=g32)
                    gy = gy.mul_(t32)
        return (
            None if gx is None else (gx * grad).to(dx),
            None if gy is None else gy.to(dy),
            (gt * grad).to(dt) if ctx.needs_input_grad[2] else None,
            (gb * grad).to(db) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 inputs accumulate in fp32); float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_scalar_tensor(value, like: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        value = torch.tensor(float(value), dtype=torch.float64, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    return value


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor, paired: bool) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must be 2-D (batch, dim); got shapes "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: image {image_features.shape[1]} vs text {text_features.shape[1]}"
        )
    if paired and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            "matched pairs need equal batch sizes: "
            f"{image_features.shape[0]} images vs {text_features.shape[0]} texts"
        )


def normalizer(normalize: str, n_rows: int, n_cols: int) -> int:
    """What the pair sum is divided by: n_rows ("batch", open_clip's), n_rows * n_cols ("pairs", the
    paper's code) or 1 ("sum")."""
    if normalize == "batch":
        return n_rows
    if normalize == "pairs":
        return n_rows * n_cols
    if normalize == "sum":
        return 1
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")


def graph_edges(k: int, graph: str) -> list[tuple[int, int]]:
    """The modality pairs (a, c) a multimodal loss averages over (see GRAPHS)."""
    if k < 2:
        raise ValueError(f"need at least 2 modalities, got {k}")
    if graph == "complete":
        return [(a, c) for a in range(k) for c in range(a + 1, k)]
    if graph == "star":
        return [(0, c) for c in range(1, k)]
    raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")


def sigrel_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    rel_bias: torch.Tensor | float,
    *,
    normalize: str = "batch",
    negatives_only: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Relative-bias sigmoid loss of matched pairs (row i of each input is pair i).

    Args:
        image_features, text_features: (B, d) embeddings, normalised by the caller as open_clip does.
        logit_scale: t, already exponentiated (what open_clip passes to its losses).
        rel_bias: b_rel; logits are t * (s - b_rel), i.e. open_clip's logit_bias = -t * b_rel.
        normalize: "batch" (sum / B, open_clip's), "pairs" (mean over B^2, the paper's code) or "sum".
        negatives_only: every pair is a negative (a text block from another rank).
        chunk_size: image rows per block; default keeps a block near 4M logits.

    Returns a float32 scalar (also under autocast / bf16 inputs).
    """
    _check_features(image_features, text_features, paired=not negatives_only)
    norm = normalizer(normalize, image_features.shape[0], text_features.shape[0])
    t = _as_scalar_tensor(logit_scale, image_features, "logit_scale")
    b = _as_scalar_tensor(rel_bias, image_features, "rel_bias")
    n = image_features.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, text_features.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = _SoftplusPairSum.apply(image_features, text_features, t, b, int(chunk_size), not negatives_only)
    return total / norm


def multimodal_sigrel_loss(
    features: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | float,
    rel_bias: torch.Tensor | float,
    *,
    graph: str = "complete",
    normalize: str = "batch",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sigrel loss for k >= 2 modalities with one shared (t, b_rel), averaged over graph edges.

    graph="complete": every pair (a, c), a < c (the authors' k(k-1)/2 average);
    graph="star": modality 0 against each of the others.
    """
    edges = graph_edges(len(features), graph)
    total = sum(
        sigrel_loss(features[a], features[c], logit_scale, rel_bias, normalize=normalize, chunk_size=chunk_size)
        for a, c in edges
    )
    return total / len(edges)


class _BatchedPairSum(torch.autograd.Function):
    """R independent sigrel losses on (R, B, d) inputs; gradients formed in forward (they only need
    sigmoid(logits)), the softplus value only when asked for (it is the slow part on CPU)."""

    @staticmethod
    def forward(ctx, x, y, t, b, norm: float, compute_value: bool):
        s = torch.bmm(x, y.transpose(1, 2))
        d = s - b[:, None, None]
        z = d * t[:, None, None]
        if compute_value:  # positives as softplus(-z_ii): no cancellation (see _pair_block)
            off = z.clone()
            off.diagonal(dim1=1, dim2=2).fill_(-math.inf)
            value = (F.softplus(off).sum((1, 2)) + F.softplus(-z.diagonal(dim1=1, dim2=2)).sum(1)) / norm
            del off
        else:
            value = torch.full(t.shape, float("nan"), dtype=z.dtype, device=z.device)
        p = torch.sigmoid(z)  # d loss / d logits (times norm): sigmoid(z) for negatives,
        # sigmoid(z) - 1 = -sigmoid(-z) for positives, computed without cancellation (in float32
        # sigmoid(z) - 1 is exactly 0 once z > ~17, which would silence every confident positive)
        torch.neg(torch.sigmoid(-z.diagonal(dim1=1, dim2=2)), out=p.diagonal(dim1=1, dim2=2))
        gt = (p * d).sum((1, 2)) / norm
        gb = -(t * p.sum((1, 2))) / norm
        p.mul_((t / norm)[:, None, None])
        # (d, B) x (B, B) products, transposed back: ~3x faster than (B, B) x (B, d) for small d on CPU
        gx = torch.bmm(y.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2) if ctx.needs_input_grad[0] else None
        gy = torch.bmm(x.transpose(1, 2), p).transpose(1, 2) if ctx.needs_input_grad[1] else None
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
        )


def batched_sigrel_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    rel_bias: torch.Tensor,
    *,
    normalize: str = "pairs",
    compute_value: bool = True,
) -> torch.Tensor:
    """R independent sigrel losses at once (e.g. the synthetic experiments' runs, as one tensor program).

    image_features, text_features: (R, B, d); logit_scale t and rel_bias b_rel: (R,). Returns the (R,)
    losses sum_ij -log sigmoid(y_ij t_r (s_ij - b_r)) / norm, same formula as ``sigrel_loss``
    (softplus(z) summed minus the diagonal logits). With ``compute_value=False`` the returned values
    are NaN but the gradients are exact: the softplus is the slowest op of a training step on CPU,
    and the gradient needs only sigmoid(z). Dense: keeps (R, B, B) temporaries (fine for the
    synthetic sizes; no blockwise chunking).
    """
    if image_features.ndim != 3 or image_features.shape != text_features.shape:
        raise ValueError(
            f"need equal (R, B, d) inputs, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    r, n = image_features.shape[:2]
    norm = normalizer(normalize, n, n)
    t = logit_scale.reshape(r).to(image_features.dtype)
    b = rel_bias.reshape(r).to(image_features.dtype)
    return _BatchedPairSum.apply(image_features, text_features, t, b, float(norm), bool(compute_value))


def _ring_sigrel_sum(image_features, text_features, logit_scale, rel_bias, chunk_size, ring: _Ring):
    """Sum of the loss terms of this rank's images against all ranks' texts (bidir / shift)."""
    _check_features(image_features, text_features, paired=True)
    t = _as_scalar_tensor(logit_scale, image_features, "logit_scale")
    b = _as_scalar_tensor(rel_bias, image_features, "rel_bias")
    if chunk_size is None:
        chunk_size = auto_chunk_size(image_features.shape[0], text_features.shape[0])
    return _RingPairSum.apply(image_features, text_features, t, b, int(chunk_size), ring)


class SigRelLoss(nn.Module):
    """Drop-in for open_clip's SigLipLoss: same call, same distributed semantics.

    open_clip calls ``loss(image_features, text_features, logit_scale, logit_bias, output_dict=True)``
    with t already exponentiated; a sigrel model reports ``logit_bias = -t * b_rel``, so
    b_rel = -logit_bias / t here and its gradient reaches the model's ``rel_bias`` exactly.

    Across ranks each rank's image rows meet every rank's texts, exchanged in open_clip's patterns
    (``dist_impl`` in bidir, shift, reduce, gather); each exchanged block is reduced blockwise.
    bidir and shift (_RingPairSum) send each peer block's text gradient back to its owner during
    the forward pass, so per-rank memory does not grow with the world size; reduce and gather use
    open_clip's autograd collectives, which hold every rank's texts at once anyway.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        normalize: str = "batch",
        chunk_size: int | None = None,
        upstream_check: str = "eager",
    ):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"unknown dist_impl {dist_impl!r}: choose one of {', '.join(DIST_IMPLS)}")
        normalizer(normalize, 1, 1)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if upstream_check not in ("auto", "eager", "deferred"):
            raise ValueError(f"upstream_check must be auto, eager or deferred, got {upstream_check!r}")
        self.rank, self.world_size, self.dist_impl = rank, world_size, dist_impl
        self.normalize, self.chunk_size = normalize, chunk_size
        self.upstream_check = upstream_check
        self._upstream_mismatches: torch.Tensor | None = None

    def defers_upstream_check(self, device: torch.device) -> bool:
        """eager (the default): backward reads the check and recomputes exactly on a mismatch; deferred:
        no host read in backward, check_upstream_gradients() raises; auto (the training entry): eager
        on CPU, where the read costs nothing, deferred on accelerators."""
        if self.upstream_check == "auto":
            return device.type != "cpu"
        return self.upstream_check == "deferred"

    def note_upstream(self, equal: torch.Tensor) -> None:
        bad = (~equal).to(torch.int64)
        self._upstream_mismatches = bad if self._upstream_mismatches is None else self._upstream_mismatches + bad

    def check_upstream_gradients(self) -> None:
        """Raises if, with the deferred check, ranks back-propagated different upstream gradients.

        bidir / shift send each peer's text gradient ahead during forward, which is exact only when
        every rank scales its loss alike (DDP). Deferred (GPU default), backward records a mismatch on
        the device; the training entry calls this on its check steps (one host read there).
        """
        count = self._upstream_mismatches
        if count is not None and int(count) > 0:
            raise RuntimeError(
                f"SigRelLoss(dist_impl={self.dist_impl!r}): in {int(count)} backward pass(es) the ranks "
                "back-propagated the loss with different upstream gradients, so the text gradients sent ahead "
                "were not exact. Scale every rank's loss alike, or use SigRelLoss(upstream_check='eager') or "
                "dist_impl 'reduce' / 'gather' (--loss-dist-impl)."
            )

    def _peer_texts(self, text_features: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """reduce / gather: other ranks' text blocks with autograd (None where it is this rank's own).

        bidir and shift go through _RingPairSum instead, which keeps no per-peer gradients.
        """
        if self.dist_impl == "reduce":
            for i in range(self.world_size):
                block = torch.distributed.nn.all_reduce(
                    text_features * (self.rank == i), torch.distributed.ReduceOp.SUM
                )
                yield None if i == self.rank else block
                if i == self.rank:
                    self._keep_graph = block  # its backward is a collective every rank must join
        else:  # gather
            blocks = torch.distributed.nn.all_gather(text_features)
            for i, block in enumerate(blocks):
                if i == self.rank:
                    self._keep_graph = block
                yield None if i == self.rank else block

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if logit_bias is None:
            raise ValueError(
                "SigRelLoss needs the model's logit_bias (= -t * b_rel); the model has none. "
                "Train with open_clip_sigrel's entry (--loss sigrel), which adds a relative bias to the model."
            )
        rel_bias = rel_bias_from_logit_bias(logit_bias, logit_scale)
        kw = dict(normalize="sum", chunk_size=self.chunk_size)
        n_cols = text_features.shape[0]
        if self.world_size > 1 and self.dist_impl in RING_DIST_IMPLS:
            total = _ring_sigrel_sum(image_features, text_features, logit_scale, rel_bias, self.chunk_size,
                                     _Ring(self.rank, self.world_size, self.dist_impl, owner=self))
            n_cols *= self.world_size
        else:
            total = sigrel_loss(image_features, text_features, logit_scale, rel_bias, **kw)
        if self.world_size > 1 and self.dist_impl not in RING_DIST_IMPLS:
            self._keep_graph = None
            for block in self._peer_texts(text_features):
                if block is not None:
                    total = total + sigrel_loss(
                        image_features, block, logit_scale, rel_bias, negatives_only=True, **kw
                    )
            if self._keep_graph is not None:
                total = total + 0.0 * self._keep_graph.sum()
                self._keep_graph = None
            n_cols *= self.world_size
        loss = total / normalizer(self.normalize, image_features.shape[0], n_cols)
        return {"contrastive_loss": loss} if output_dict else loss

