"""Cost of the training hook's geometry metrics per evaluation, as a ratio to open_clip's own metrics.

    python benchmarks/bench_geometry.py [--n 2048,8192] [--dim 512] [--repeats 3]

For each N: the median wall time of ``open_clip_train.train.get_clip_metrics`` (what every open_clip
evaluation computes) and of ``geometry_metrics`` with the hook's presets on the same float32 CPU
features, and the ratio of the medians (geometry / get_clip_metrics: what the hook adds on top of the
stock metrics). Two feature sets: "gap" (the two modalities offset, as trained CLIP/SigLIP features
are: linearly separable, so the separability fit stops at its first classifier) and "no gap" (random
matched pairs, not separable: the L-BFGS fit runs to its iteration limit, the full set's worst case).
Uses torch's thread setting as it is; nothing here runs in the tests.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _features(n: int, d: int, gap: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x + 1.2 * torch.randn(n, d, generator=g)  # matched, noisy: retrieval well below 100%
    if gap:
        offset = torch.zeros(d)
        offset[0] = 0.5 * d**0.5  # a modality offset of about the rows' norm
        x, y = x + offset, y - offset
    return torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool), not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from open_clip_train.train import get_clip_metrics

    from open_clip_sigrel.io import format_table
    from open_clip_sigrel.metrics.geometry import PRESETS, geometry_metrics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2048,8192", help="comma-separated numbers of pairs")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    try:  # every size checked before the first measurement (argparse's error: line, exit 2)
        sizes = [int(v) for v in a.n.split(",")]
    except ValueError:
        p.error(f"--n: expected comma-separated integers, got {a.n!r}")
    for flag, values in (("--n", sizes), ("--dim", [a.dim]), ("--repeats", [a.repeats])):
        if not values or not all(1 <= v <= (1 << 24) for v in values):
            p.error(f"{flag} must be integers in [1, {1 << 24}], got {values}")
    if min(sizes) < 2:
        p.error(f"--n must be >= 2 (pairs), got {sizes}")
    t, bias = torch.tensor(10.0), -10.0
    rows = []
    for n in sizes:
        for gap in (True, False):
            x, y = _features(n, a.dim, gap)
            stock = _median_time(lambda x=x, y=y: get_clip_metrics(x, y, t), a.repeats)
            row = [f"{n:,}", "gap" if gap else "no gap", f"{stock:.3f}"]
            for preset in ("cheap", "full"):
                sec = _median_time(lambda x=x, y=y, preset=preset: geometry_metrics(
                    x, y, logit_scale=float(t), logit_bias=bias, metrics=PRESETS[preset]), a.repeats)
                row += [f"{sec:.3f}", f"{sec / stock:.2f}x"]
            rows.append(row)
            print(f"  N = {n}, {row[1]}: done", flush=True)
    head = ("N", "features", "get_clip_metrics s", "cheap s", "cheap / stock", "full s", "full / stock")
    print(format_table(head, rows, title=f"geometry hook vs open_clip get_clip_metrics, d = {a.dim}, CPU float32, "
                       f"median of {a.repeats}, {torch.get_num_threads()} threads"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
