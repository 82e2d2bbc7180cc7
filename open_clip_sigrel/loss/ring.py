"""The ring exchange of open_clip's bidir / shift patterns for the sigrel loss: each peer's text
gradient goes back to its owner during the forward pass, so a rank keeps O(B d) whatever the world size."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from open_clip_sigrel.loss.kernel import _finish, _pair_block, _prepare


class _Ring:
    """Where this rank sits and how text blocks travel (open_clip's bidir or shift pattern)."""

    def __init__(self, rank: int, world_size: int, dist_impl: str, owner=None):
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
