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

NORMALIZATIONS = ("batch", "pairs", "sum")
# Elements of one row block of logits (fp32): 4M = 16 MiB per temporary.
_CHUNK_ELEMENTS = 1 << 22


def auto_chunk_size(n_rows: int, n_cols: int) -> int:
    """Rows per block so that a block of logits holds about 4M elements."""
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(n_cols, 1)))


class _SoftplusPairSum(torch.autograd.Function):
    """sum_ij softplus(t * (<x_i, y_j> - b)), blockwise, float32, gradient formed in forward.

    d/dz softplus(z) = sigmoid(z), so per block: dL/dS = t * sigmoid(z), dL/dt = sum sigmoid(z) (S - b),
    dL/db = -t * sum sigmoid(z). Only the O((n + m) d) gradients are saved for backward.
    """

    @staticmethod
    def forward(ctx, x, y, t, b, chunk_size: int):
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        need_any = need_x or need_y or need_t or need_b
        acc = _accumulation_dtype(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, y32 = x.to(acc), y.to(acc)
            t32, b32 = t.detach().to(acc).reshape(()), b.detach().to(acc).reshape(())
            total = x32.new_zeros(())
            gx = torch.zeros_like(x32) if need_x else None
            gy = torch.zeros_like(y32) if need_y else None
            gt = x32.new_zeros(())
            gb = x32.new_zeros(())
            for lo in range(0, x32.shape[0], chunk_size):
                xc = x32[lo:lo + chunk_size]
                d = (xc @ y32.T).sub_(b32)  # S - b
                z = d * t32
                total += torch.nn.functional.softplus(z).sum()
                if not need_any:
                    continue
                p = z.sigmoid_()  # in place: z is no longer needed
                if need_t:
                    gt += torch.dot(p.view(-1), d.view(-1))
                if need_b:
                    gb -= p.sum()
                p.mul_(t32)  # dL/dS
                if need_x:
                    gx[lo:lo + chunk_size] = p @ y32
                if need_y:
                    gy.addmm_(p.T, xc)
            gb *= t32
        ctx.save_for_backward(
            gx if need_x else None, gy if need_y else None, gt.reshape(t.shape), gb.reshape(b.shape)
        )
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


def _normalizer(normalize: str, n_rows: int, n_cols: int) -> int:
    if normalize == "batch":
        return n_rows
    if normalize == "pairs":
        return n_rows * n_cols
    if normalize == "sum":
        return 1
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


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
    norm = _normalizer(normalize, image_features.shape[0], text_features.shape[0])
    t = _as_scalar_tensor(logit_scale, image_features, "logit_scale")
    b = _as_scalar_tensor(rel_bias, image_features, "rel_bias")
    n = image_features.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, text_features.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = _SoftplusPairSum.apply(image_features, text_features, t, b, int(chunk_size))
    if not negatives_only:
        # sum_i logits_ii = t * (sum_i <u_i, v_i> - B b_rel): the positive labels, in O(B d).
        acc = total.dtype
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            pos = (image_features.to(acc) * text_features.to(acc)).sum()
            total = total - t.to(acc).reshape(()) * (pos - n * b.to(acc).reshape(()))
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
    if len(features) < 2:
        raise ValueError(f"need at least 2 modalities, got {len(features)}")
    if graph == "complete":
        edges = [(a, c) for a in range(len(features)) for c in range(a + 1, len(features))]
    elif graph == "star":
        edges = [(0, c) for c in range(1, len(features))]
    else:
        raise ValueError(f"graph must be 'complete' or 'star', got {graph!r}")
    total = sum(
        sigrel_loss(features[a], features[c], logit_scale, rel_bias, normalize=normalize, chunk_size=chunk_size)
        for a, c in edges
    )
    return total / len(edges)


def rel_bias_from_logit_bias(logit_bias: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """b_rel = -logit_bias / t (open_clip adds the bias, the paper subtracts it)."""
    return -logit_bias / logit_scale


class SigRelLoss(nn.Module):
    """Drop-in for open_clip's SigLipLoss: same call, same distributed semantics.

    open_clip calls ``loss(image_features, text_features, logit_scale, logit_bias, output_dict=True)``
    with t already exponentiated; a sigrel model reports ``logit_bias = -t * b_rel``, so
    b_rel = -logit_bias / t here and its gradient reaches the model's ``rel_bias`` exactly.

    Across ranks each rank's image rows meet every rank's texts, exchanged with open_clip's own
    helpers (``dist_impl`` in bidir, shift, reduce, gather); each exchanged block is reduced blockwise.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        normalize: str = "batch",
        chunk_size: int | None = None,
    ):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"unknown dist_impl {dist_impl!r}: choose bidir, shift, reduce or gather")
        _normalizer(normalize, 1, 1)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.rank, self.world_size, self.dist_impl = rank, world_size, dist_impl
        self.normalize, self.chunk_size = normalize, chunk_size

    def _peer_texts(self, text_features: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Yields other ranks' text blocks (None where a collective returns this rank's own)."""
        from open_clip.loss import neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad

        right = (self.rank + 1) % self.world_size
        left = (self.rank - 1 + self.world_size) % self.world_size
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            num_bidir, remainder = divmod(self.world_size - 1, 2)
            for _ in range(num_bidir):
                recv = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                yield from recv
                to_left, to_right = recv
            if remainder:
                yield neighbour_exchange_with_grad(left, right, to_right)
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(self.world_size - 1):
                to_right = neighbour_exchange_with_grad(left, right, to_right)
                yield to_right
        elif self.dist_impl == "reduce":
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
        total = sigrel_loss(image_features, text_features, logit_scale, rel_bias, **kw)
        n_cols = text_features.shape[0]
        if self.world_size > 1:
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
        loss = total / _normalizer(self.normalize, image_features.shape[0], n_cols)
        return {"contrastive_loss": loss} if output_dict else loss


def siglip_init_logits() -> tuple[float, float]:
    """(log t, b_rel) of SigLIP's initialisation: t = 10, logit_bias = -10, i.e. b_rel = 1."""
    return math.log(10.0), 1.0
