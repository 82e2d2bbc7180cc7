"""Time and peak memory of the sigrel loss vs open_clip's (a script beside the package, like timm's benchmark.py).

    python benchmarks/bench.py loss --batch 4096,8192,16384 --dim 768 [--device cuda] [--dtype bf16] [--json]
    python benchmarks/bench.py dist --world 1,2,4 --batch 2048 --dim 768 [--impl bidir] [--json]
    python benchmarks/bench.py train [--steps 30] [--device cuda] [--precision amp_bf16] [--json]

It runs from any directory (by path) and needs open_clip_sigrel importable (``pip install -e .`` in the
checkout, or PYTHONPATH=<checkout>); it is not part of the wheel.

Every measurement runs in a fresh process (this script again, with ``--worker``), so its peak memory
is its own and not what an earlier measurement left in the allocator. ``--device cuda`` on a machine
without a CUDA device stops with an error (exit status 2) before anything runs.

Implementations compared by bench loss (ratios are against open_clip's SigLipLoss):
  sigrel             open_clip_sigrel.SigRelLoss, logit_bias from a trainable b_rel (open_clip_sigrel.bias)
  open_clip          open_clip.loss.SigLipLoss() as released (materializes B x B logits)
  open_clip-chunked  SigLipLoss(chunk_size=...) where the installed open_clip has that parameter (open_clip's
                     main branch; no release up to 3.3.0), with sigrel's rows per block; otherwise skipped and
                     the reason recorded under "skipped_impls"
  siglip-kernel      siglip_kernel.fused_siglip_loss (Triton), on CUDA with that package installed

How peak extra memory is measured:
  CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() before the measured steps.
  CPU   peak resident set size (RSS) minus the RSS before the measured steps. The kernel's RSS
        high-water mark (VmHWM) is reset by writing "5" to /proc/self/clear_refs; where that is
        not allowed a thread samples VmRSS every ~1 ms instead (getrusage's max RSS, which cannot
        be reset, is the last resort off Linux). The process runs with glibc's
        MALLOC_MMAP_THRESHOLD_ pinned at 64 KiB, so every large tensor is its own mmap and freed
        memory goes back to the OS: RSS then follows the live tensors instead of what glibc keeps
        cached. That makes allocation slower, so on CPU the time per step comes from a second
        fresh process with the default allocator.
  Both  the baseline is taken after the inputs exist and one warm-up step ran (thread pools and
        communication buffers are set up once and are not the loss's memory); the peak covers
        the measured steps, including the gradients of the inputs that backward creates.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from open_clip_sigrel.bias import logit_bias_from_rel_bias
from open_clip_sigrel.io import atomic_write_text, check_writable_file, format_table
from open_clip_sigrel.loss import DIST_IMPLS, SigRelLoss, auto_chunk_size

MIB = float(1 << 20)
LOSS_IMPLS = ("sigrel", "open_clip", "open_clip-chunked", "siglip-kernel")
DTYPES = ("fp32", "bf16")
# Every tensor above 64 KiB gets its own mmap, returned to the OS on free (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
_RESULT_PREFIX = "BENCH-RESULT "
_MAX_SIZE = 1 << 24  # largest batch / dimension / count a flag may ask for (beyond it: out of memory, or days)
PROG = "bench.py"


class BenchArgumentError(ValueError):
    """A flag combination that cannot run (exit status 2)."""



# ----------------------------------------------------------------------------- parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bench.py {loss,dist,train}``."""
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("loss", formatter_class=fmt,
                       help="one process: forward + backward of sigrel vs open_clip's SigLipLoss")
    p.add_argument("--batch", type=_int_list, default=[4096, 8192, 16384], help="batch sizes, comma separated")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the features")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each implementation this many times, alternating the order (noisy machines)")
    p.add_argument("--impls", type=_str_list, default=None,
                   help=f"subset of {','.join(LOSS_IMPLS)} (default: all that apply; open_clip is always run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each process (default: torch's)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per block of sigrel and open_clip-chunked (default: sigrel's auto_chunk_size)")
    _add_output_flags(p)

    p = sub.add_parser("dist", formatter_class=fmt,
                       help="per-rank peak memory and time across gloo ranks on this machine")
    p.add_argument("--world", type=_int_list, default=[1, 2, 4], help="world sizes, comma separated")
    p.add_argument("--batch", type=int, default=2048, help="local batch per rank")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension")
    p.add_argument("--impl", choices=DIST_IMPLS, default="bidir", help="dist_impl of both losses")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: usable cores // world, at least 1)")
    _add_output_flags(p)

    p = sub.add_parser("train", formatter_class=fmt,
                       help="open_clip training steps of sigrel-tiny: --siglip vs --loss sigrel")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps of each run left out of the median")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per loss; the order alternates (siglip, sigrel, then sigrel, siglip, ...)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="sigrel-tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default=None,
                   help="open_clip_train --precision of both runs, e.g. amp_bf16 (None: open_clip's own default)")
    p.add_argument("--data-dir", default=None,
                   help="digit dataset cache (default: a folder in the system temp dir, built once)")
    p.add_argument("--logs", default=None, help="keep the runs' logs here (default: a temporary folder)")
    _add_output_flags(p)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--output", default=None, help="also write the JSON document to this file")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _check_args(args: argparse.Namespace) -> None:
    """BenchArgumentError for what argparse's types leave open: dist's --batch, --threads, sizes too big
    to allocate, an unknown --model, an --output that cannot be written."""
    batch = getattr(args, "batch", None)
    for value in (batch if isinstance(batch, list) else [batch]):
        if value is not None and not 1 <= value <= _MAX_SIZE:
            raise BenchArgumentError(f"--batch must be in [1, {_MAX_SIZE}], got {value}")
    for name in ("dim", "batch_size", "steps", "repeats", "rounds", "warmup", "warmup_steps", "chunk_size"):
        value = getattr(args, name, None)
        if value is not None and value > _MAX_SIZE:
            raise BenchArgumentError(f"--{name.replace('_', '-')} must be at most {_MAX_SIZE}, got {value}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise BenchArgumentError(f"--threads must be >= 1, got {threads}")
    if getattr(args, "bench", None) == "train":
        import open_clip

        from open_clip_sigrel.configs import register_shipped_configs

        register_shipped_configs()
        if args.model not in open_clip.list_models():
            raise BenchArgumentError(f"--model {args.model!r} is not an open_clip model config (e.g. sigrel-tiny; "
                                     "open_clip.list_models() lists them)")
    if getattr(args, "output", None):
        try:
            check_writable_file(args.output)
        except ValueError as e:
            raise BenchArgumentError(str(e)) from None


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    """Runs the chosen benchmark; prints a table (or JSON). Returns 0, 1 if a measurement failed, 2 on bad input."""
    for name in ("repeats", "steps", "rounds", "dim", "batch_size", "chunk_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"{PROG}: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "warmup", 0) < 0 or getattr(args, "warmup_steps", 0) < 0:
        print(f"{PROG}: error: warm-up counts must be >= 0", file=sys.stderr)
        return 2
    try:
        _check_args(args)  # everything that would otherwise fail after the measurements, or run nonsense
        doc = {"loss": bench_loss, "dist": bench_dist, "train": bench_train}[args.bench](args)
    except BenchArgumentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(doc, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    if args.json:
        print(text)
        for impl, reason in doc.get("skipped_impls", {}).items():  # the table prints these itself
            print(f"{PROG}: skipped {impl}: {reason}", file=sys.stderr)
    else:
        print(format_report(doc))
    return 1 if any(row.get("error") for row in doc["rows"]) else 0


# ----------------------------------------------------------------------------- bench loss


def bench_loss(args: argparse.Namespace) -> dict:
    """Every (batch, implementation) in fresh processes; ratios against open_clip's SigLipLoss."""
    check_device(args.device)
    impls, skipped = _loss_impls(args.device, args.impls)
    base = {"dim": args.dim, "dtype": args.dtype, "device": args.device, "threads": args.threads,
            "chunk_size": args.chunk_size}
    rows, env = [], {}
    for batch in args.batch:
        cfg = {**base, "batch": batch}
        by_impl: dict[str, dict] = {impl: {"batch": batch, "dim": args.dim, "dtype": args.dtype, "impl": impl}
                                    for impl in impls}
        for impl in impls:
            if impl in ("sigrel", "open_clip-chunked"):
                by_impl[impl]["chunk_size"] = effective_chunk_size(batch, args.chunk_size)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        if args.device == "cpu":
            for impl in impls:  # memory: one warm-up and one measured step, pinned allocator
                res = _run_worker("loss", {**cfg, "impl": impl, "mode": "memory", "warmup": 1, "repeats": 1},
                                  extra_env=MEMORY_ENV)
                _merge(by_impl[impl], res, memory=True)
                env = env or res.get("env", {})
            for r in range(args.rounds):  # time: default allocator, order alternates between rounds
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    if by_impl[impl].get("error"):
                        continue
                    res = _run_worker("loss", {**cfg, "impl": impl, "mode": "time", "warmup": args.warmup,
                                               "repeats": args.repeats})
                    _merge(by_impl[impl], res, memory=False)
                    times[impl] += res.get("times_ms", [])
        else:  # CUDA's allocator statistics are exact: one process measures both
            for r in range(args.rounds):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    res = _run_worker("loss", {**cfg, "impl": impl, "mode": "both", "warmup": args.warmup,
                                               "repeats": args.repeats})
                    _merge(by_impl[impl], res, memory=True)
                    times[impl] += res.get("times_ms", [])
                    env = env or res.get("env", {})
        for impl in impls:
            row = by_impl[impl]
            row["time_ms"] = statistics.median(times[impl]) if times[impl] and not row.get("error") else None
            row["times_ms"] = times[impl]  # every timed step, all rounds
            rows.append(row)
        _add_ratios([by_impl[i] for i in impls], by_impl["open_clip"],
                    {"time_ratio": "time_ms", "mem_ratio": "peak_extra_MiB"})
    return {
        "benchmark": "loss",
        "columns": ["batch", "dim", "dtype", "impl", "time_ms", "peak_extra_MiB", "time_ratio", "mem_ratio"],
        "rows": rows,
        "reference_impl": "open_clip",
        "skipped_impls": skipped,
        "environment": {**_environment(args.device), **env,
                        "memory_method": env.get("memory_method", "cuda" if args.device == "cuda" else None),
                        "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds},
        "notes": "time_ms: median step (forward + backward); peak_extra_MiB: peak memory over the inputs' "
                 "(see the docstring of benchmarks/bench.py); time_ratio / mem_ratio: "
                 "impl / open_clip's SigLipLoss at the same batch.",
    }


def check_device(device: str) -> None:
    """BenchArgumentError unless ``device`` can run here (``--device cuda`` needs a CUDA device)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BenchArgumentError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}; "
            f"torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            "Run on a machine with a GPU, or use --device cpu."
        )


def effective_chunk_size(batch: int, chunk_size: int | None) -> int:
    """Rows per block that sigrel (and open_clip-chunked, given the same) uses at this batch."""
    return min(chunk_size, batch) if chunk_size else auto_chunk_size(batch, batch)


def open_clip_chunked_support() -> str | None:
    """None if open_clip's SigLipLoss takes ``chunk_size`` (open_clip's main branch), else why not."""
    import inspect

    try:
        import open_clip
        from open_clip.loss import SigLipLoss

        params = inspect.signature(SigLipLoss).parameters
    except Exception as e:  # noqa: BLE001 - the reason is reported, the impl skipped
        return f"open_clip.loss.SigLipLoss could not be inspected: {type(e).__name__}: {e}"
    if "chunk_size" not in params:
        return (f"open_clip {getattr(open_clip, '__version__', '?')}: SigLipLoss has no chunk_size parameter "
                "(it exists on open_clip's main branch, in no release up to 3.3.0)")
    return None


def unavailable_impls(device: str) -> dict[str, str]:
    """Optional implementations that cannot run here, each with the reason."""
    out = {}
    reason = open_clip_chunked_support()
    if reason:
        out["open_clip-chunked"] = reason
    if device != "cuda":
        out["siglip-kernel"] = "needs --device cuda (Triton kernels)"
    elif importlib.util.find_spec("siglip_kernel") is None:
        out["siglip-kernel"] = "the siglip-kernel package is not installed (pip install siglip-kernel)"
    return out


def _loss_impls(device: str, requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """(implementations to run, {optional implementation left out: why}).

    sigrel and open_clip always; open_clip-chunked where open_clip's SigLipLoss has chunk_size;
    siglip-kernel (Triton) only on CUDA with the package installed. An explicitly requested
    implementation that cannot run is an error; a default one is skipped with its reason.
    """
    missing = unavailable_impls(device)
    if requested is None:
        return [i for i in LOSS_IMPLS if i not in missing], missing
    unknown = set(requested) - set(LOSS_IMPLS)
    if unknown:
        raise BenchArgumentError(f"unknown --impls {sorted(unknown)}: choose from {', '.join(LOSS_IMPLS)}")
    for impl in requested:
        if impl in missing:
            raise BenchArgumentError(f"--impls {impl}: {missing[impl]}")
    return ["open_clip"] + [i for i in LOSS_IMPLS if i in requested and i != "open_clip"], {}


def _merge(row: dict, res: dict, memory: bool) -> None:
    if res.get("error"):
        row["error"] = row.get("error") or res["error"]
        row.setdefault("peak_extra_MiB", None)
        return
    if memory:
        row["peak_extra_MiB"] = res["peak_extra_bytes"] / MIB
        row["loss"] = res.get("loss")


def _add_ratios(rows: list[dict], ref: dict, ratios: dict[str, str]) -> None:
    for row in rows:
        for name, key in ratios.items():
            a, b = row.get(key), ref.get(key)
            row[name] = a / b if a is not None and b else None


def _loss_worker(cfg: dict) -> dict:
    """One measurement of one implementation at one size (runs in its own process)."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    step, leaves = _loss_step(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"env": {"threads": torch.get_num_threads()}}

    loss = None
    for _ in range(cfg["warmup"]):
        loss = step()
    sync()
    gc.collect()
    meter = _CudaPeak() if device.type == "cuda" else PeakRSS()
    times = []
    with meter:
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    out["loss"] = float(loss)
    if cfg["mode"] in ("time", "both"):
        out["times_ms"] = times
    if cfg["mode"] in ("memory", "both"):
        out["peak_extra_bytes"] = meter.peak_extra
        out["env"]["memory_method"] = meter.method
    return out


def _loss_step(cfg: dict, device) -> tuple[Callable[[], Any], list]:
    """A closure doing forward + backward (and dropping the gradients) on fixed random inputs."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    g = torch.Generator().manual_seed(cfg.get("seed", 0))
    feats = [F.normalize(torch.randn(cfg["batch"], cfg["dim"], generator=g), dim=-1).to(device, dtype)
             for _ in range(2)]
    img, txt = (f.requires_grad_() for f in feats)
    log_t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
    impl = cfg["impl"]
    if impl == "sigrel":
        loss_fn = SigRelLoss(chunk_size=cfg.get("chunk_size"))
        b = torch.tensor(1.0, device=device, requires_grad=True)  # the model's trainable b_rel

        def forward():
            t = log_t.exp()
            return loss_fn(img, txt, logit_scale=t, logit_bias=logit_bias_from_rel_bias(b, t))
    elif impl == "open_clip":
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss()
        b = torch.tensor(-10.0, device=device, requires_grad=True)  # the model's trainable logit_bias

        def forward():
            return loss_fn(img, txt, logit_scale=log_t.exp(), logit_bias=b)
    elif impl == "open_clip-chunked":
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss(chunk_size=effective_chunk_size(cfg["batch"], cfg.get("chunk_size")))
        b = torch.tensor(-10.0, device=device, requires_grad=True)

        def forward():
            return loss_fn(img, txt, logit_scale=log_t.exp(), logit_bias=b)
    elif impl == "siglip-kernel":
        from siglip_kernel import fused_siglip_loss

        b = torch.tensor(-10.0, device=device, requires_grad=True)

        def forward():
            return fused_siglip_loss(img, txt, log_t, b)  # takes log t
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    leaves = [img, txt, log_t, b]

    def step():
        loss = forward()
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss.detach()

    return step, leaves


# ----------------------------------------------------------------------------- memory meters


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak RSS over a ``with`` block minus the RSS at its start, in bytes (``.peak_extra``).

    ``.method`` says how: "vmhwm" (kernel high-water mark, reset via clear_refs), "sampler"
    (VmRSS read every ~1 ms by a thread; misses spikes shorter than that) or "getrusage"
    (max RSS since process start; a lower bound when the process peaked before the block).
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.method = ""
        self.peak_extra = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> PeakRSS:
        try:
            self._base = _proc_status_kib("VmRSS")
        except OSError:
            import resource

            self.method = "getrusage"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _proc_status_kib("VmHWM") <= _proc_status_kib("VmRSS") + 64:
                self.method = "vmhwm"
                return self
        except OSError:
            pass
        self.method = "sampler"
        self._sampled = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _proc_status_kib("VmRSS"))
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.method == "getrusage":
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if sys.platform == "darwin":  # bytes there, KiB on Linux
                peak, self._base = peak // 1024, self._base // 1024
        elif self.method == "vmhwm":
            peak = _proc_status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _proc_status_kib("VmRSS"))
        self.peak_extra = max(0, peak - self._base) * 1024


class _CudaPeak:
    """torch.cuda.max_memory_allocated() over the block minus memory_allocated() at its start."""

    method = "cuda_max_memory_allocated"

    def __enter__(self) -> _CudaPeak:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak_extra = torch.cuda.max_memory_allocated() - self._base


# ----------------------------------------------------------------------------- bench dist


def bench_dist(args: argparse.Namespace) -> dict:
    """For each world size and loss: gloo ranks on this machine, the largest per-rank peak and time."""
    impls = ("sigrel", "open_clip")
    rows = []
    first: dict[str, dict] = {}
    for world in args.world:
        per_world = {}
        for impl in impls:
            cfg = {"world": world, "batch": args.batch, "dim": args.dim, "impl": impl, "dist_impl": args.impl,
                   "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
            res = _run_worker("dist", cfg, extra_env=MEMORY_ENV)
            row = {"world": world, "batch": args.batch, "dim": args.dim, "impl": impl, "dist_impl": args.impl}
            if res.get("error"):
                row.update(error=res["error"], time_ms=None, peak_extra_MiB=None)
            else:
                ranks = res["ranks"]
                row["time_ms"] = max(r["time_ms"] for r in ranks)
                row["peak_extra_MiB"] = max(r["peak_extra_bytes"] for r in ranks) / MIB
                row["rank_peaks_MiB"] = [r["peak_extra_bytes"] / MIB for r in ranks]
                row["threads_per_rank"] = ranks[0]["threads"]
                row["memory_method"] = ranks[0]["memory_method"]
            first.setdefault(impl, row)
            per_world[impl] = row
            rows.append(row)
        _add_ratios(list(per_world.values()), per_world["open_clip"], {"mem_ratio": "peak_extra_MiB"})
    for row in rows:
        _add_ratios([row], first[row["impl"]], {"mem_vs_first": "peak_extra_MiB", "time_vs_first": "time_ms"})
    return {
        "benchmark": "dist",
        "columns": ["world", "batch", "dim", "impl", "dist_impl", "time_ms", "peak_extra_MiB", "mem_vs_first",
                    "time_vs_first", "mem_ratio"],
        "rows": rows,
        "environment": {**_environment("cpu"), "backend": "gloo", "repeats": args.repeats,
                        "warmup": args.warmup},
        "notes": f"batch is per rank; time_ms / peak_extra_MiB: the largest over ranks; *_vs_first: against "
                 f"world {args.world[0]}; mem_ratio: sigrel / open_clip at the same world size. The ranks share "
                 "this machine's cores, so time grows with the world size.",
    }


def _dist_worker(cfg: dict) -> dict:
    """Spawns cfg['world'] gloo ranks (fresh processes) and collects each one's measurement."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sigrel-bench-dist-") as tmp:
        mp.start_processes(_dist_rank, args=(cfg, free_port(), tmp), nprocs=cfg["world"], start_method="spawn")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(cfg["world"])]
    return {"ranks": ranks}


def _dist_rank(rank: int, cfg: dict, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    world = cfg["world"]
    torch.set_num_threads(cfg.get("threads") or max(1, _usable_cpus() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = _dist_step(cfg, rank, world)
        for _ in range(cfg["warmup"]):
            step()
        dist.barrier()
        gc.collect()
        times = []
        with PeakRSS() as meter:
            for _ in range(cfg["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        result = {"rank": rank, "time_ms": statistics.median(times), "times_ms": times,
                  "peak_extra_bytes": meter.peak_extra, "memory_method": meter.method,
                  "threads": torch.get_num_threads()}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dist_step(cfg: dict, rank: int, world: int) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1000 + rank)
    img, txt = (F.normalize(torch.randn(cfg["batch"], cfg["dim"], generator=g), dim=-1).requires_grad_()
                for _ in range(2))
    log_t = torch.tensor(math.log(10.0), requires_grad=True)
    if cfg["impl"] == "sigrel":
        loss_fn = SigRelLoss(rank=rank, world_size=world, dist_impl=cfg["dist_impl"])
        b = torch.tensor(1.0, requires_grad=True)

        def forward():
            t = log_t.exp()
            return loss_fn(img, txt, logit_scale=t, logit_bias=logit_bias_from_rel_bias(b, t))
    else:
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss(rank=rank, world_size=world, dist_impl=cfg["dist_impl"])
        b = torch.tensor(-10.0, requires_grad=True)

        def forward():
            return loss_fn(img, txt, logit_scale=log_t.exp(), logit_bias=b)

    def step() -> None:
        forward().backward()
        for leaf in (img, txt, log_t, b):
            leaf.grad = None

    return step


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- bench train


def bench_train(args: argparse.Namespace) -> dict:
    """Runs open_clip training of the tiny model with --siglip and --loss sigrel, alternating, same data."""
    from open_clip_sigrel.hosts.telemetry import TELEMETRY_FILE, read_telemetry
    from open_clip_sigrel.tools.data import ensure_digits_dataset

    check_device(args.device)
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "open_clip_sigrel-bench-digits")
    info = ensure_digits_dataset(data_dir)
    losses = ("siglip", "sigrel")
    steps: dict[str, list[float]] = {loss: [] for loss in losses}
    runs = []
    with _log_dir(args.logs) as logs:
        for r in range(args.rounds):
            for loss in (losses if r % 2 == 0 else losses[::-1]):
                name = f"bench-{loss}-r{r}-{os.getpid()}"
                cmd = [sys.executable, "-m", "open_clip_sigrel.cli.train",
                       *train_argv(loss, info["train_data"], args.steps, args.batch_size, args.model, logs, name,
                                   device=args.device, precision=args.precision)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                telemetry = Path(logs) / name / TELEMETRY_FILE
                parsed = step_times(read_telemetry(telemetry)) if telemetry.exists() else []
                run_info = {"loss": loss, "round": r, "returncode": proc.returncode, "wall_s": wall,
                            "steps_logged": len(parsed)}
                if proc.returncode != 0 or not parsed:
                    run_info["error"] = _last_lines(proc.stderr or proc.stdout)
                runs.append(run_info)
                steps[loss] += parsed[args.warmup_steps:]
    rows = []
    for loss in losses:
        vals = steps[loss]
        errors = [r["error"] for r in runs if r["loss"] == loss and r.get("error")]
        row = {"loss": loss, "steps": args.steps, "batch_size": args.batch_size, "measured_steps": len(vals),
               "step_time_ms": statistics.median(vals) * 1e3 if vals else None}
        if errors or not vals:
            row["error"] = errors[0] if errors else "no measured steps (raise --steps above --warmup-steps)"
        rows.append(row)
    _add_ratios(rows, rows[0], {"time_ratio": "step_time_ms"})
    return {
        "benchmark": "train",
        "columns": ["loss", "steps", "batch_size", "measured_steps", "step_time_ms", "time_ratio"],
        "rows": rows,
        "runs": runs,
        "environment": {**_environment(args.device), "model": args.model, "rounds": args.rounds,
                        "precision": args.precision, "warmup_steps": args.warmup_steps,
                        "train_data": info["train_data"]},
        "notes": "step_time_ms: median wall time between consecutive steps of the run's sigrel_train.jsonl "
                 "(one record per step, data loading included) after the warm-up steps, pooled over rounds; "
                 "ratio: against siglip.",
    }


#: The only flags in which the two training runs differ.
TRAIN_LOSS_FLAGS = {"siglip": ["--siglip"], "sigrel": ["--loss", "sigrel"]}


def train_argv(loss: str, train_data: str, steps: int, batch_size: int, model: str, logs: str, name: str,
               device: str = "cpu", precision: str | None = None) -> list[str]:
    """The open-clip-sigrel-train flags of one run (all of them, defined here only): the loss's own flag, then
    what both runs share: same data, seed and steps (one epoch of ``steps * batch_size`` samples), one
    telemetry record per step, no checkpoints."""
    return [*TRAIN_LOSS_FLAGS[loss],
            "--model", model, "--train-data", train_data, "--train-num-samples", str(steps * batch_size),
            "--dataset-type", "webdataset", "--batch-size", str(batch_size), "--workers", "1", "--epochs", "1",
            "--lr", "1e-3", "--warmup", "5", "--device", device, "--logs", str(logs), "--name", name,
            "--log-every-n-steps", "1", "--seed", "0", "--save-frequency", "0",
            *(["--precision", precision] if precision else [])]


def step_times(records: list[dict]) -> list[float]:
    """Seconds from each step's record to the next one's (--log-every-n-steps 1: one record a step)."""
    return [b["time"] - a["time"] for a, b in zip(records, records[1:]) if b["step"] == a["step"] + 1]


@contextlib.contextmanager
def _log_dir(path: str | None) -> Iterator[str]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield str(Path(path).absolute())
        return
    tmp = tempfile.mkdtemp(prefix="sigrel-bench-train-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- common


def _environment(device: str) -> dict:
    import platform

    import torch

    try:
        import open_clip

        oc_version = open_clip.__version__
    except Exception:  # noqa: BLE001 - report, don't fail, on an odd install
        oc_version = None
    env = {"torch": torch.__version__, "open_clip": oc_version, "device": device,
           "threads": torch.get_num_threads(), "usable_cpus": _usable_cpus(), "python": platform.python_version(),
           "platform": platform.platform()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _run_worker(kind: str, cfg: dict, extra_env: dict | None = None) -> dict:
    """Runs one measurement in a fresh interpreter; returns its result or {'error': ...}.

    A measurement process that dies (rarely seen here: a SIGABRT in a gloo rank on a loaded machine) is
    run once more; the result then records the first failure under 'retried_after'.
    """
    first = None
    for _ in range(2):
        result = _run_worker_once(kind, cfg, extra_env)
        if "error" not in result or "out of memory" in result["error"] or first is not None:
            break
        first = result["error"]
    if first is not None and "error" not in result:
        result["retried_after"] = first
    return result


def _run_worker_once(kind: str, cfg: dict, extra_env: dict | None) -> dict:
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else _last_lines(proc.stderr)
    return {"error": f"exit {proc.returncode}: {reason}"}


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "no output"


def _worker_main(argv: list[str]) -> int:
    # The worker is this script run as __main__. The gloo ranks that _dist_worker spawns unpickle
    # __main__._dist_rank: multiprocessing's spawn re-imports the parent's main script by its path (as
    # __mp_main__, so the `if __name__ == "__main__"` block below does not run again) and resolves
    # __main__ to it. No package module or sys.path entry is needed.
    kind, cfg = argv[0], json.loads(argv[1])
    try:
        result = {"loss": _loss_worker, "dist": _dist_worker}[kind](cfg)
    except Exception as e:  # noqa: BLE001 - reported to the parent as this measurement's error
        if "out of memory" in str(e).lower():
            result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        else:
            raise
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def format_report(doc: dict) -> str:
    """The table of doc['rows'] over doc['columns'] (the package's format_table), then the environment and
    failures."""
    cols = doc["columns"]
    lines = [format_table(cols, [[_fmt(row.get(c), c, row) for c in cols] for row in doc["rows"]])]
    env = doc.get("environment", {})
    lines.append("")
    lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if doc.get("notes"):
        lines.append("notes: " + doc["notes"])
    for impl, reason in doc.get("skipped_impls", {}).items():
        lines.append(f"skipped {impl}: {reason}")
    for row in doc["rows"]:
        if row.get("error"):
            lines.append(f"error ({', '.join(str(row.get(c)) for c in cols[:4])}): {row['error']}")
    return "\n".join(lines)


def _fmt(value: Any, col: str, row: dict) -> str:
    if value is None:
        return "failed" if row.get("error") and col in ("time_ms", "peak_extra_MiB", "step_time_ms") else "-"
    if isinstance(value, float):
        if "ratio" in col or "_vs_" in col:
            return f"{value:.3f}"
        return f"{value:.1f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """``bench.py {loss,dist,train} ...`` (and, internally, ``bench.py --worker KIND CONFIG``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
