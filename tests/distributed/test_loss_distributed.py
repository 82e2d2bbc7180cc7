"""SigRelLoss across gloo ranks equals the single-process loss over the concatenated batch.

One spawn of 4 processes serves world sizes 2, 3 and 4 (a fresh process group each; ranks beyond
the world size sit out) and every dist_impl, because starting processes dominates the run time.
Per world size and implementation, each rank saves its loss and gradients; the checks run here.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from open_clip_sigrel.loss import sigrel_loss

WORLDS = (2, 3, 4)
IMPLS = ("bidir", "shift", "reduce", "gather")
B, D = 6, 8  # local batch, feature dim
T0, B_REL = 7.0, 0.3  # logits t (s - b_rel) reach both signs, so both softplus branches run
CHUNK = 4  # does not divide B: ragged blocks


def _global_features(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(100 + world)
    x = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    y[: world * B // 2] = F.normalize(y[: world * B // 2] + 2 * x[: world * B // 2], dim=-1)  # some close pairs
    return x, y


def _leaves(x: torch.Tensor, y: torch.Tensor, rank: int):
    rows = slice(rank * B, (rank + 1) * B)
    return (x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_(),
            torch.tensor(math.log(T0), dtype=torch.float64, requires_grad=True),
            torch.tensor(B_REL, dtype=torch.float64, requires_grad=True))


def _run(loss_fn, x, y, log_t, b, weight: float = 1.0) -> dict:
    t = log_t.exp()
    loss = loss_fn(x, y, t, -t * b)
    (loss * weight).backward()
    return {"loss": loss.detach(), "x": x.grad, "y": y.grad, "log_t": log_t.grad, "b": b.grad}


def _rank_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from open_clip.loss import SigLipLoss

    from open_clip_sigrel.loss import SigRelLoss

    torch.set_num_threads(1)
    for world in WORLDS:
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store{world}", rank=rank, world_size=world)
        try:
            x, y = _global_features(world)
            results = {}
            for impl in IMPLS:
                def sigrel(normalize, chunk=CHUNK, impl=impl, world=world):
                    return SigRelLoss(rank, world, impl, normalize=normalize, chunk_size=chunk)

                results[impl] = {
                    "sum": _run(sigrel("sum"), *_leaves(x, y, rank)),
                    "batch": _run(sigrel("batch", None), *_leaves(x, y, rank)),
                    # ranks back-propagate differently scaled losses: the text gradients sent ahead
                    # during forward must then be recomputed with each sender's factor
                    "weighted": _run(sigrel("sum"), *_leaves(x, y, rank), weight=rank + 1.0),
                    "siglip": _run(SigLipLoss(rank=rank, world_size=world, dist_impl=impl), *_leaves(x, y, rank)),
                }
                for name, weight in (("deferred_equal", 1.0), ("deferred_weighted", rank + 1.0)):
                    loss = SigRelLoss(rank, world, impl, normalize="sum", chunk_size=CHUNK, upstream_check="deferred")
                    results[impl][name] = _run(loss, *_leaves(x, y, rank), weight=weight)
                    try:
                        loss.check_upstream_gradients()
                        results[impl][name]["error"] = None
                    except RuntimeError as e:
                        results[impl][name]["error"] = str(e)
            torch.save(results, Path(out_dir) / f"w{world}_r{rank}.pt")
            dist.barrier()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_rank_worker, args=(str(out),), nprocs=max(WORLDS), start_method="spawn")
    return {w: [torch.load(out / f"w{w}_r{r}.pt") for r in range(w)] for w in WORLDS}


def _reference(world: int, row_weights: torch.Tensor | None = None) -> dict:
    """Single process over the concatenated batch; with row_weights: sum_i w_i (row i's loss), directly."""
    x, y = _global_features(world)
    x.requires_grad_()
    y.requires_grad_()
    log_t = torch.tensor(math.log(T0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B_REL, dtype=torch.float64, requires_grad=True)
    t = log_t.exp()
    if row_weights is None:
        loss = sigrel_loss(x, y, t, b, normalize="sum", chunk_size=5)
    else:
        labels = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
        loss = (row_weights[:, None] * -F.logsigmoid(labels * t * (x @ y.T - b))).sum()
    loss.backward()
    return {"loss": loss.detach(), "x": x.grad, "y": y.grad, "log_t": log_t.grad, "b": b.grad}


def _assert_matches_reference(ranks: list[dict], ref: dict, scale: float = 1.0) -> None:
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) * scale, ref["loss"], **close)
    torch.testing.assert_close(torch.cat([r["x"] for r in ranks]) * scale, ref["x"], **close)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]) * scale, ref["y"], **close)
    torch.testing.assert_close(sum(r["log_t"] for r in ranks) * scale, ref["log_t"], **close)
    torch.testing.assert_close(sum(r["b"] for r in ranks) * scale, ref["b"], **close)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_sum_over_ranks_equals_single_process(rank_results, world, impl):
    ranks = [r[impl]["sum"] for r in rank_results[world]]
    _assert_matches_reference(ranks, _reference(world))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_batch_normalisation_divides_by_local_batch(rank_results, world, impl):
    """normalize="batch": each rank's loss is its rows' sum / local B (open_clip's convention)."""
    ranks = [r[impl]["batch"] for r in rank_results[world]]
    _assert_matches_reference(ranks, _reference(world), scale=B)
    for r in rank_results[world]:
        torch.testing.assert_close(r[impl]["batch"]["loss"] * B, r[impl]["sum"]["loss"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_ranks_with_different_upstream_gradients(rank_results, world, impl):
    weights = torch.arange(1, world + 1, dtype=torch.float64).repeat_interleave(B)
    ranks = [r[impl]["weighted"] for r in rank_results[world]]
    ref = _reference(world, row_weights=weights)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["x"] for r in ranks]), ref["x"], **close)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), ref["y"], **close)
    torch.testing.assert_close(sum(r["log_t"] for r in ranks), ref["log_t"], **close)
    torch.testing.assert_close(sum(r["b"] for r in ranks), ref["b"], **close)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_deferred_upstream_check_is_exact_for_ddp_and_loud_otherwise(rank_results, world, impl):
    """The GPU default: no host read in backward; equal upstream gradients stay exact, unequal ones raise."""
    equal = [r[impl]["deferred_equal"] for r in rank_results[world]]
    assert all(r["error"] is None for r in equal)
    _assert_matches_reference(equal, _reference(world))
    errors = [r[impl]["deferred_weighted"]["error"] for r in rank_results[world]]
    if impl in ("bidir", "shift"):  # the ring sends text gradients ahead; every rank sees the mismatch
        assert all(e and "different upstream gradients" in e for e in errors), errors
    else:  # reduce / gather: open_clip's autograd collectives are exact for any upstream gradient
        assert errors == [None] * world


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_agrees_with_open_clip_siglip_per_rank(rank_results, world, impl):
    """SigRelLoss(rank, world, impl) vs open_clip's SigLipLoss with logit_bias = -t * b_rel, rank by rank."""
    for r in rank_results[world]:
        ours, theirs = r[impl]["batch"], r[impl]["siglip"]
        for key in ("loss", "x", "y", "log_t", "b"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=key)
