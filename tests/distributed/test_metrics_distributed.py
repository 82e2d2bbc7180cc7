"""GeometryMetric under distributed evaluation: gloo ranks holding different, unequal shards compute
exactly the one-shot geometry_metrics of the concatenated features, on every rank.

One spawn of 3 CPU processes serves world sizes 2 and 3 (a fresh process group on a free port each;
a rank beyond the world size sits out), because starting processes dominates the run time.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from open_clip_sigrel.metrics import CHEAP_GROUPS, geometry_metrics

D = 6
KW = dict(logit_scale=9.0, logit_bias=-3.0, chunk_size=5)
# per world: the rows of each rank, as a list of update sizes (a rank may update several times, or never)
CASES = {
    "w2": (2, [[13], [9, 15]]),
    "w3": (3, [[7], [4, 11, 4], [11]]),
    "w3_empty": (3, [[20], [], [3, 14]]),  # rank 1 holds nothing
}


def _features(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated features of a case (same seed on every rank), float64."""
    n = sum(sum(r) for r in CASES[case][1])
    g = torch.Generator().manual_seed(len(case) * 7 + n)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, x + 0.8 * torch.randn(n, D, generator=g, dtype=torch.float64) + 0.1


def _captions(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """1 to 3 captions per image of a case (in image order) and each caption's image."""
    x, _ = _features(case)
    owner = torch.repeat_interleave(torch.arange(x.shape[0]), 1 + torch.arange(x.shape[0]) % 3)
    g = torch.Generator().manual_seed(x.shape[0])
    return x[owner] + 0.8 * torch.randn(owner.numel(), D, generator=g, dtype=torch.float64) + 0.1, owner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, ports: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from open_clip_sigrel.metrics import GeometryMetric

    torch.set_num_threads(1)  # a fresh process: nothing of the caller's to restore
    for case, (world, sizes) in CASES.items():
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[case]}", rank=rank, world_size=world)
        try:
            x, y = _features(case)
            start = sum(sum(r) for r in sizes[:rank])
            results = {}
            for name, groups in (("all", None), ("cheap", CHEAP_GROUPS)):
                m = GeometryMetric(metrics=groups, **KW)
                lo = start
                for n in sizes[rank]:
                    m.update(x[lo:lo + n], y[lo:lo + n])
                    lo += n
                local = m.n_pairs
                results[name] = m.compute()
                assert m.n_pairs == local  # compute gathers into a copy: the local state is unchanged
            captions, owner = _captions(case)
            m = GeometryMetric(**KW)
            lo = start
            for n in sizes[rank]:  # an update holds its images' captions, owners counted within the update
                mine = (owner >= lo) & (owner < lo + n)
                m.update(x[lo:lo + n], captions[mine], text_image=owner[mine] - lo)
                lo += n
            results["multi"] = m.compute()
            m = GeometryMetric(**KW)
            lo = start
            for n in sizes[rank]:
                m.update(x[lo:lo + n], y[lo:lo + n])
                lo += n
            state = m.sync_state()
            results["gathered"] = {k: v.tolist() for k, v in state.items()}
            (Path(out_dir) / f"{case}_r{rank}.json").write_text(json.dumps(results))
            dist.barrier()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("metric_dist")
    ports = {case: _free_port() for case in CASES}
    mp.start_processes(_rank_worker, args=(ports, str(out)), nprocs=max(w for w, _ in CASES.values()),
                       start_method="spawn")
    return {case: [json.loads((out / f"{case}_r{r}.json").read_text()) for r in range(world)]
            for case, (world, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_the_one_shot_numbers(rank_results, case):
    x, y = _features(case)
    captions, owner = _captions(case)
    want = {"all": geometry_metrics(x, y, **KW), "cheap": geometry_metrics(x, y, metrics=CHEAP_GROUPS, **KW),
            "multi": geometry_metrics(x, captions, text_image=owner, **KW)}
    assert want["multi"]["n_pairs"] == owner.numel() > x.shape[0]
    assert want["all"]["n_pairs"] == x.shape[0]
    # JSON round-trips Python floats exactly, so == is bit-for-bit equality
    want = json.loads(json.dumps(want))
    for rank, got in enumerate(rank_results[case]):
        # every rank holds every shard, in rank order
        gathered = got.pop("gathered")
        assert (gathered["image_features"], gathered["text_features"]) == (x.tolist(), y.tolist()), (case, rank)
        assert got == want, (case, rank)

