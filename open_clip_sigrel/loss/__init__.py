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

    kernel.py   pair_terms_: the loss terms and dloss/dlogits of one block (every loss in the package);
                the single-device and batched autograd functions built on it
    ring.py     the bidir / shift exchange across ranks (gradients sent back during forward)
    here        the public losses, SigRelLoss (open_clip's call), and the name sets
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from open_clip_sigrel.bias import rel_bias_from_logit_bias
from open_clip_sigrel.loss.kernel import _BatchedPairSum, _SoftplusPairSum, auto_chunk_size, pair_terms_  # noqa: F401
from open_clip_sigrel.loss.ring import _Ring, _RingPairSum

NORMALIZATIONS = ("batch", "pairs", "sum")
#: open_clip's cross-rank exchange patterns (--loss-dist-impl); bidir and shift run as a ring (_RingPairSum).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
RING_DIST_IMPLS = ("bidir", "shift")
#: how k >= 2 modalities are paired: every pair (a < c), or modality 0 against each other one
GRAPHS = ("complete", "star")


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
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:  # the loss would be 0 / 0 = NaN
        raise ValueError(
            "an empty batch has no sigmoid loss: got "
            f"{image_features.shape[0]} images and {text_features.shape[0]} texts (need >= 1 each)"
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
    (loss.kernel.pair_terms_ on one dense block per run). With ``compute_value=False`` the returned values
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

