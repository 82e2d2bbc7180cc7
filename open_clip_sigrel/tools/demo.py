"""`open-clip-sigrel demo`: the tiny model trained with ``--siglip`` and with ``--loss sigrel``, side by side.

Both runs go through open_clip's own training loop (``python -m open_clip_sigrel.cli.train`` in a fresh
subprocess each: open_clip's logging set-up is process-global) on the shipped digit-mosaic dataset
(``open_clip_sigrel.tools.data``, built once into a cache), with the same seed, data, schedule and starting
logits (t0 = 10, logit_bias0 = -10, i.e. b_rel0 = 1). Only the loss differs:

* ``--siglip``       open_clip's SigLipLoss with an absolute, trainable ``logit_bias``;
* ``--loss sigrel``  the relative-bias loss, logits = t * (s - b_rel) with b_rel trainable.

Afterwards the demo reads each run's last evaluation (open_clip's ``results.jsonl``, with the
plugin's geometry metrics) and its last 'Train Epoch' log lines, prints a table (or one JSON
document with ``--json``), writes plots, and says in two sentences what the numbers show.

Layout under ``--output`` (default ``./sigrel_demo``)::

    data/                         the dataset cache (``--data-dir``)
    runs/siglip/, runs/sigrel/    open_clip's run folders: out.log, sigrel_train.jsonl (per-step telemetry),
                                  checkpoints/results.jsonl, epoch_N.pt
    runs/<name>.console.log       everything the training subprocess printed
    comparison.png                t, b_rel, train loss, val margin and R@1 of both runs
    <name>_curves.png             open_clip_sigrel.tools.plots.plot_training_curves of each run
    summary.json                  what ``--json`` prints

Defaults (batch 32, lr 1e-3, warmup 100 steps, 6 epochs of 64 steps, fp32) were chosen so that both
runs leave the collapsed start and reach a val R@1 far above chance (1/512; about 0.16-0.20 both ways
after 6 epochs) in a few CPU minutes. The SigLIP start b_rel0 = 1 is meant for batches of ~32k: at
batch 32 the first steps pull all similarities up together until every pair scores alike (train
loss plateau ~4.45 = min over z of softplus(-z) + 31 softplus(z)) and the features separate only
later, around epoch 2. With batch 64 and warmup 5-20 steps, or lr >= 3e-3, the tiny model stayed in
that plateau for the whole run in our trials (open_clip's default ``--precision amp`` is float16
autocast on CPU and did not learn either).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from open_clip_sigrel.hosts.common import TELEMETRY_FILE, read_telemetry

__all__ = [
    "DEFAULTS",
    "RUNS",
    "configure_parser",
    "run",
    "run_demo",
    "training_argv",
    "train_records",
    "summarize_run",
    "format_table",
    "interpret",
]

MODEL = "sigrel-tiny"
#: The two runs: name, the loss flags given to the training entry, and the table's column title.
RUNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("siglip", ("--siglip",), "--siglip"),
    ("sigrel", ("--loss", "sigrel"), "--loss sigrel"),
)
DEFAULTS: dict[str, Any] = {
    "epochs": 6,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup": 100,
    "wd": 0.2,
    "seed": 0,
    "n_train": 2048,
    "n_val": 512,
    "workers": 1,
}
#: Starting logits shared by both runs (open_clip's --siglip init): t0 and b_rel0 = -logit_bias0 / t0.
INIT_T, INIT_REL_BIAS = 10.0, 1.0

# Rows of the table: (key in a run's summary, label).
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("train_loss", "train loss (mean of last epoch)"),
    ("logit_scale", "t = exp(logit_scale)"),
    ("rel_bias", "b_rel (model; -logit_bias/t)"),
    ("logit_bias", "logit_bias = -t * b_rel"),
    ("image_to_text_R@1", "val R@1 image->text"),
    ("text_to_image_R@1", "val R@1 text->image"),
    ("margin_mean", "val margin_mean (halved)"),
    ("margin_trimmed", "val margin_trimmed"),
    ("rel_bias_mean", "val rel_bias_mean (embeddings)"),
    ("gap_l2m", "val gap (gap_l2m)"),
    ("linear_separability", "val linear separability"),
    ("sigmoid_loss", "val sigmoid loss (sum / N_val)"),
)
# Evaluation keys copied from the last results.jsonl line into a run's summary.
EVAL_KEYS = (
    "image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5",
    "margin_mean", "margin_trimmed", "margin_worst", "rel_bias_mean", "rel_bias_trimmed",
    "gap_l2m", "linear_separability", "xi", "sigmoid_loss", "clip_val_loss",
)

# ------------------------------------------------------------------------------------------ CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``open-clip-sigrel demo``."""
    d = DEFAULTS
    parser.add_argument("--output", default="sigrel_demo",
                        help="folder for the runs, plots and summary (created; earlier demo runs in it are replaced)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset cache (built on first use, reused afterwards); default: OUTPUT/data")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs of each run")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="batch size of each run")
    parser.add_argument("--lr", type=float, default=d["lr"],
                        help="learning rate (open_clip uses it for the weights, log t and the bias alike)")
    parser.add_argument("--warmup", type=int, default=d["warmup"], help="linear warmup steps (then cosine decay)")
    parser.add_argument("--wd", type=float, default=d["wd"], help="weight decay (open_clip's; not on t / biases)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="training seed, the same for both runs")
    parser.add_argument("--n-train", type=int, default=d["n_train"], help="training samples (digit mosaics)")
    parser.add_argument("--n-val", type=int, default=d["n_val"], help="validation samples (retrieval among these)")
    parser.add_argument("--workers", type=int, default=d["workers"], help="data loader workers per run")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: report on the runs already in --output")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Entry of ``open-clip-sigrel demo``: 0 on success, 1 if a run failed, 2 on bad flags."""
    try:
        summary = run_demo(
            output=args.output, data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, warmup=args.warmup, wd=args.wd, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
            workers=args.workers, train=not args.report_only, plots=not args.no_plots,
            progress=None if args.quiet else _stderr,
        )
    except ValueError as e:
        print(f"open-clip-sigrel demo: error: {e}", file=sys.stderr)
        return 2
    except DemoRunError as e:
        print(f"open-clip-sigrel demo: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False, default=_json_default))
    else:
        print(format_table(summary["runs"], n_val=summary["settings"]["n_val"]))
        print()
        print(summary["interpretation"])
        print()
        print(f"Runs, logs and checkpoints: {summary['runs_dir']}")
        for plot in summary["plots"]:
            print(f"Plot: {plot}")
    return 0


class DemoRunError(RuntimeError):
    """A training run failed or left no results."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _json_default(value: Any) -> Any:
    return str(value)


# ------------------------------------------------------------------------------------- training


def _validate(epochs: int, batch_size: int, lr: float, warmup: int, wd: float, n_train: int, n_val: int,
              workers: int) -> None:
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (a contrastive batch needs negatives), got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"--wd must be >= 0, got {wd}")
    if n_train < batch_size:
        raise ValueError(f"--n-train ({n_train}) must be at least --batch-size ({batch_size})")
    if n_val < 2:
        raise ValueError(f"--n-val must be >= 2 (retrieval needs candidates), got {n_val}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")


def training_argv(loss_flags: tuple[str, ...] | list[str], data: dict, *, logs: str | os.PathLike, name: str,
                  epochs: int, batch_size: int, lr: float, warmup: int, wd: float, seed: int,
                  workers: int) -> list[str]:
    """The argv of ``python -m open_clip_sigrel.cli.train`` for one demo run (open_clip flags + loss flags)."""
    return [
        *loss_flags,
        "--model", MODEL,
        "--train-data", data["train_data"],
        "--train-num-samples", str(data["train_num_samples"]),
        "--val-data", data["val_data"],
        "--val-num-samples", str(data["val_num_samples"]),
        "--dataset-type", "webdataset",
        "--batch-size", str(batch_size),
        "--epochs", str(epochs),
        "--lr", repr(float(lr)),
        "--warmup", str(warmup),
        "--wd", repr(float(wd)),
        # open_clip's default "amp" is float16 autocast, which on CPU is slow and loses the tiny model.
        "--precision", "fp32",
        "--workers", str(workers),
        "--device", "cpu",
        "--seed", str(seed),
        "--val-frequency", "1",
        "--log-every-n-steps", "1",  # every step: the epoch's mean loss and smooth t / b_rel curves
        "--logs", str(logs),
        "--name", name,
    ]


def _train_one(name: str, argv: list[str], runs_dir: Path, progress) -> float:
    """Runs one training subprocess; returns its wall time. Raises DemoRunError on failure."""
    run_dir = runs_dir / name
    if run_dir.exists():  # open_clip refuses to reuse an experiment folder
        shutil.rmtree(run_dir)
    console = runs_dir / f"{name}.console.log"
    cmd = [sys.executable, "-m", "open_clip_sigrel.cli.train", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    watcher = _Progress(name, run_dir, start, progress) if progress is not None else None
    with open(console, "w", buffering=1) as log, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if watcher is not None:
                watcher.poll()
        rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "".join(console.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise DemoRunError(f"the {name} run failed (exit status {rc}); last lines of {console}:\n{tail}")
    return wall


class _Progress:
    """Reports epoch ends and evaluations as they land in the run's structured logs."""

    def __init__(self, name: str, run_dir: Path, start: float, progress):
        self.name, self.run_dir, self.start, self.progress = name, run_dir, start, progress
        self.epochs_seen, self.evals_seen = 0, 0

    def poll(self) -> None:
        steps = train_records(self.run_dir) if (self.run_dir / TELEMETRY_FILE).is_file() else []
        ends = [r for r in steps if r["epoch_progress"] == r["epoch"] + 1]
        for rec in ends[self.epochs_seen:]:
            self.progress(f"[demo {self.name}] epoch {rec['epoch'] + 1}: train loss {_fmt(rec['train_loss_epoch_mean'])}, "
                          f"t {_fmt(rec.get('logit_scale'))}, b_rel {_fmt(rec.get('rel_bias'))} "
                          f"({time.perf_counter() - self.start:.0f} s)")
        self.epochs_seen = len(ends)
        evals = _read_jsonl(self.run_dir / "checkpoints" / "results.jsonl")
        for row in evals[self.evals_seen:]:
            self.progress(f"[demo {self.name}] val after epoch {row.get('epoch')}: R@1 image->text "
                          f"{_fmt(row.get('image_to_text_R@1'), 3)}, text->image {_fmt(row.get('text_to_image_R@1'), 3)}")
        self.evals_seen = len(evals)


def run_demo(*, output: str | os.PathLike = "sigrel_demo", data_dir: str | os.PathLike | None = None,
             epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
             warmup: int = DEFAULTS["warmup"], wd: float = DEFAULTS["wd"], seed: int = DEFAULTS["seed"],
             n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"], workers: int = DEFAULTS["workers"],
             train: bool = True, plots: bool = True, progress=None) -> dict:
    """Trains (unless ``train=False``) both runs and returns the summary (what ``--json`` prints).

    Raises ValueError on bad settings and DemoRunError when a run fails or left no results.
    """
    output = Path(output).expanduser().absolute()
    runs_dir = output / "runs"
    settings_path = output / "settings.json"
    start = time.perf_counter()
    walls: dict[str, float | None] = {name: None for name, _, _ in RUNS}
    if train:
        _validate(epochs, batch_size, lr, warmup, wd, n_train, n_val, workers)
        from open_clip_sigrel.tools.data import ensure_digits_dataset

        data_path = Path(data_dir).expanduser().absolute() if data_dir is not None else output / "data"
        if progress is not None:
            progress(f"[demo] dataset: {data_path} ({n_train} train / {n_val} val digit mosaics)")
        data = ensure_digits_dataset(data_path, n_train=n_train, n_val=n_val, csv=False)
        settings = {
            "model": MODEL, "epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup": warmup, "wd": wd,
            "seed": seed, "n_train": n_train, "n_val": n_val, "workers": workers, "precision": "fp32",
            "init_logit_scale": INIT_T, "init_rel_bias": INIT_REL_BIAS, "data_dir": str(data_path),
            "steps_per_epoch": n_train // batch_size,
        }
        runs_dir.mkdir(parents=True, exist_ok=True)
        settings_path.unlink(missing_ok=True)
        for name, flags, _ in RUNS:
            argv = training_argv(flags, data, logs=runs_dir, name=name, epochs=epochs, batch_size=batch_size,
                                 lr=lr, warmup=warmup, wd=wd, seed=seed, workers=workers)
            settings[f"argv_{name}"] = argv
            if progress is not None:
                progress(f"[demo {name}] training: python -m open_clip_sigrel.cli.train {' '.join(flags)} ... "
                         f"({epochs} epochs x {n_train // batch_size} steps)")
            walls[name] = _train_one(name, argv, runs_dir, progress)
        settings["wall_s"] = {k: round(v, 1) for k, v in walls.items() if v is not None}
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    else:
        if not settings_path.is_file():
            raise ValueError(f"no finished demo in {output} (settings.json missing); run without --report-only")
        settings = json.loads(settings_path.read_text())

    runs = {name: summarize_run(runs_dir / name) for name, _, _ in RUNS}
    plot_paths = _write_plots(runs_dir, output, progress) if plots else []
    summary = {
        "settings": settings,
        "runs": runs,
        "interpretation": interpret(runs, n_val=settings["n_val"]),
        "output_dir": str(output),
        "runs_dir": str(runs_dir),
        "plots": [str(p) for p in plot_paths],
        "wall_s": round(time.perf_counter() - start, 1) if train else None,
    }
    (output / "summary.json").write_text(
        json.dumps(summary, indent=2, allow_nan=False, default=_json_default) + "\n")
    return summary


# ----------------------------------------------------------------------------------- reading logs


def train_records(run_dir: str | os.PathLike) -> list[dict]:
    """The run's structured training telemetry (sigrel_train.jsonl), one dict per logged step.

    Keys: epoch, step, epoch_progress (epoch + fraction of its steps done), lr, logit_scale (t),
    rel_bias, logit_bias, train_loss (this step) and train_loss_epoch_mean (mean of the epoch's
    logged steps so far).
    """
    rows = read_telemetry(run_dir)
    per_epoch: dict[int, int] = {}
    for r in rows:
        per_epoch[r["epoch"]] = max(per_epoch.get(r["epoch"], 0), r["step"] + 1)
    first = {e: min(r["step"] for r in rows if r["epoch"] == e) for e in per_epoch}
    steps_per_epoch = max((per_epoch[e] - first[e] for e in per_epoch), default=1)
    out, sums = [], {}
    for r in rows:
        e = r["epoch"]
        total, count = sums.get(e, (0.0, 0))
        sums[e] = (total + r["loss"], count + 1)
        done = r["step"] - steps_per_epoch * e + 1
        out.append({
            "epoch": e, "step": r["step"], "epoch_progress": e + done / steps_per_epoch,
            "lr": r.get("lr"), "logit_scale": r.get("logit_scale"), "rel_bias": r.get("rel_bias"),
            "logit_bias": r.get("logit_bias"), "train_loss": r["loss"],
            "train_loss_epoch_mean": sums[e][0] / sums[e][1],
        })
    return out


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize_run(run_dir: str | os.PathLike) -> dict:
    """One row of the demo: final train loss, t, b_rel, logit_bias and the last evaluation's metrics.

    t / b_rel / logit_bias come from the last evaluation when it has them (the geometry metrics,
    full precision), else from the last 'Train Epoch' line. ``history`` holds, per epoch, the end of
    epoch train values and that epoch's evaluation. Raises DemoRunError when the run left no log.
    """
    run_dir = Path(run_dir)
    log_path = run_dir / TELEMETRY_FILE
    if not log_path.is_file():
        raise DemoRunError(f"no training telemetry at {log_path}")
    train = train_records(run_dir)
    if not train:
        raise DemoRunError(f"{log_path} has no training step")
    results = _read_jsonl(run_dir / "checkpoints" / "results.jsonl")
    last_train, last_eval = train[-1], (results[-1] if results else {})

    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "epochs_trained": math.floor(last_train["epoch_progress"] + 1e-9),
        "train_loss": last_train.get("train_loss_epoch_mean"),
        "train_loss_last_batch": last_train.get("train_loss"),
    }
    t = _finite(last_eval.get("logit_scale")) or last_train.get("logit_scale")
    bias = _finite(last_eval.get("logit_bias"))
    if bias is None:
        bias = last_train.get("logit_bias")
    rel = _finite(last_eval.get("rel_bias_model"))
    if rel is None and bias is not None and t:
        rel = -bias / t
    if rel is None:
        rel = last_train.get("rel_bias")
    row.update(logit_scale=t, rel_bias=rel, logit_bias=bias)
    for key in EVAL_KEYS:
        row[key] = _finite(last_eval.get(key))
    row["val_epoch"] = _finite(last_eval.get("epoch"))

    ends: dict[int, dict] = {}
    for rec in train:
        ends[rec["epoch"]] = rec
    history = []
    by_epoch = {int(r["epoch"]): r for r in results if _finite(r.get("epoch")) is not None}
    for epoch in sorted(ends):
        rec = ends[epoch]
        ev = by_epoch.get(epoch + 1, {})  # open_clip evaluates after epoch e with "epoch": e + 1
        history.append({
            "epoch": epoch + 1,
            "train_loss": rec.get("train_loss_epoch_mean"),
            "logit_scale": rec.get("logit_scale"),
            "rel_bias": rec.get("rel_bias"),
            **{k: _finite(ev.get(k)) for k in ("image_to_text_R@1", "text_to_image_R@1", "margin_mean",
                                                "rel_bias_mean", "rel_bias_model")},
        })
    row["history"] = history
    row["steps"] = [{k: rec.get(k) for k in ("epoch_progress", "train_loss", "logit_scale", "rel_bias")}
                    for rec in train]
    return row


# ------------------------------------------------------------------------------------- reporting


def _fmt(value: Any, digits: int = 4) -> str:
    v = _finite(value)
    if v is None:
        return "n/a"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


def format_table(runs: dict[str, dict], *, n_val: int | None = None) -> str:
    """The side-by-side table of both runs (columns in RUNS order)."""
    names = [name for name, _, _ in RUNS if name in runs]
    titles = {name: title for name, _, title in RUNS}
    label_w = max(len(label) for _, label in TABLE_ROWS)
    col_w = max(14, *(len(titles[n]) for n in names))
    lines = [f"{'':<{label_w}}  " + "  ".join(f"{titles[n]:>{col_w}}" for n in names)]
    lines.append("-" * len(lines[0]))
    for key, label in TABLE_ROWS:
        lines.append(f"{label:<{label_w}}  " + "  ".join(f"{_fmt(runs[n].get(key)):>{col_w}}" for n in names))
    if n_val:
        lines.append(f"(chance R@1 = 1/{n_val} = {1 / n_val:.4f}; both runs start at t = {INIT_T:g}, "
                     f"b_rel = {INIT_REL_BIAS:g})")
    return "\n".join(lines)


def interpret(runs: dict[str, dict], *, n_val: int) -> str:
    """Two sentences on what the numbers show, computed from the numbers (no canned conclusion)."""
    sig, rel = runs.get("siglip", {}), runs.get("sigrel", {})
    b_sig, b_rel = _finite(sig.get("rel_bias")), _finite(rel.get("rel_bias"))
    t_sig, t_rel = _finite(sig.get("logit_scale")), _finite(rel.get("logit_scale"))
    if None in (b_sig, b_rel):
        first = "The relative bias could not be read from both runs' logs."
    else:
        d_sig, d_rel = abs(b_sig - INIT_REL_BIAS), abs(b_rel - INIT_REL_BIAS)
        if d_rel > 2 * d_sig + 0.01:
            moved = (f"the relative-bias run moved b_rel {d_rel / max(d_sig, 1e-4):.0f}x further than the "
                     "absolute-bias run, as the paper's Adam argument predicts (a relative bias moves ~lr per step "
                     "in cosine units, an absolute one ~lr/t)")
        elif d_sig > 2 * d_rel + 0.01:
            moved = "the absolute-bias run moved b_rel further than the relative-bias run"
            if t_sig is not None and t_sig > 1.01 * INIT_T and b_sig < INIT_REL_BIAS:
                moved += (f" (its t grew to {t_sig:.2f}, and -logit_bias/t shrinks as t grows: the drift toward 0 "
                          "the paper describes for an absolute bias)")
        else:
            moved = (f"neither moved it far from the start (t ended at {_fmt(t_sig, 2)} / {_fmt(t_rel, 2)}), so in a "
                     "run this short the two parametrisations trained almost alike")
        away = [name for name, b in (("--siglip", b_sig), ("--loss sigrel", b_rel)) if abs(b) >= 0.1]
        if len(away) == 2:
            zero = "both keep b_rel well away from 0"
        elif away:
            zero = f"only {away[0]} keeps b_rel away from 0"
        else:
            zero = "both ended with b_rel near 0"
        mids = [_finite(r.get("rel_bias_mean")) for r in (sig, rel)]
        mid = (f"; the embeddings' own midpoint between matched and unmatched similarity (rel_bias_mean) is "
               f"{_fmt(mids[0], 3)} vs {_fmt(mids[1], 3)}") if None not in mids else ""
        first = (f"b_rel went from {INIT_REL_BIAS:.2f} to {b_sig:.3f} with --siglip (-logit_bias/t) and to {b_rel:.3f} "
                 f"with --loss sigrel: {zero}; {moved}{mid}.")

    chance = 1.0 / n_val
    r = {name: [_finite(run.get(k)) for k in ("image_to_text_R@1", "text_to_image_R@1")]
         for name, run in (("siglip", sig), ("sigrel", rel))}
    if any(v is None for vals in r.values() for v in vals):
        return first + " Validation retrieval was not recorded for both runs, so they cannot be compared."
    mean = {name: sum(vals) / 2 for name, vals in r.items()}
    learned = [name for name in mean if mean[name] >= 5 * chance]
    # Standard error of a difference of two R@1 fractions on n_val pairs (two directions averaged).
    p = max(min((mean["siglip"] + mean["sigrel"]) / 2, 1 - 1e-9), 1e-9)
    se = math.sqrt(2 * p * (1 - p) / (2 * n_val))
    diff = mean["sigrel"] - mean["siglip"]
    margins = [_finite(run.get("margin_mean")) for run in (sig, rel)]
    margin = (f" and a mean halved margin of {_fmt(margins[1], 3)} vs {_fmt(margins[0], 3)}"
              if None not in margins else "")
    head = (f"Val R@1 (image->text / text->image, chance {chance:.4f}) is {r['sigrel'][0]:.3f} / {r['sigrel'][1]:.3f} "
            f"for --loss sigrel vs {r['siglip'][0]:.3f} / {r['siglip'][1]:.3f} for --siglip{margin}")
    if len(learned) < 2:
        failed = [n for n in mean if n not in learned]
        tail = (f"; {' and '.join('--' + n if n == 'siglip' else '--loss sigrel' for n in failed)} stayed near chance, "
                "so train longer (--epochs) or with a lower --lr before reading anything into it.")
    elif abs(diff) <= 2 * se:
        tail = (f": a difference of {diff:+.3f} in mean R@1, within two standard errors ({2 * se:.3f}) of one seed on "
                f"{n_val} pairs, so on this tiny model both losses learn about equally well.")
    else:
        better = "--loss sigrel" if diff > 0 else "--siglip"
        tail = (f": {better} retrieves better by {abs(diff):.3f} in mean R@1 (more than two standard errors, "
                f"{2 * se:.3f}), though this is one seed of a tiny model.")
    return first + " " + head + tail


def _write_plots(runs_dir: Path, output: Path, progress) -> list[Path]:
    """comparison.png (own figure) and, when open_clip_sigrel.tools.plots is there, each run's curves."""
    written: list[Path] = []
    try:
        written.append(plot_comparison(runs_dir, output / "comparison.png"))
    except Exception as e:  # plots are a bonus: never lose the numbers over them
        if progress is not None:
            progress(f"[demo] comparison plot skipped: {e}")
    try:
        from open_clip_sigrel.tools.plots import plot_training_curves
    except ImportError:
        return written
    for name, _, title in RUNS:
        results = runs_dir / name / "checkpoints" / "results.jsonl"
        if not results.is_file():
            continue
        try:
            written.append(Path(plot_training_curves(results, output / f"{name}_curves.png",
                                                     title=f"demo: {title}")))
        except Exception as e:
            if progress is not None:
                progress(f"[demo] {name} curves skipped: {e}")
    return written


def plot_comparison(runs_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """2x2 figure of both runs: train loss, t, b_rel (per step) and val margin / R@1 (per epoch)."""
    from matplotlib.figure import Figure

    runs_dir = Path(runs_dir)
    fig = Figure(figsize=(11, 7))
    axes = [fig.add_subplot(2, 2, k) for k in range(1, 5)]
    colours = {"siglip": "tab:blue", "sigrel": "tab:red"}
    for name, _, title in RUNS:
        if not (runs_dir / name / TELEMETRY_FILE).is_file():
            continue
        steps = train_records(runs_dir / name)
        c = colours[name]
        for ax, key in zip(axes[:3], ("train_loss", "logit_scale", "rel_bias")):
            pts = [(s["epoch_progress"], s[key]) for s in steps if _finite(s.get(key)) is not None]
            if pts:
                ax.plot(*zip(*pts), color=c, lw=1, label=title)
        evals = _read_jsonl(runs_dir / name / "checkpoints" / "results.jsonl")
        for key, style, label in (("margin_mean", "-", "margin_mean"),
                                  ("image_to_text_R@1", "--", "R@1 i->t"),
                                  ("text_to_image_R@1", ":", "R@1 t->i")):
            pts = [(r["epoch"], r[key]) for r in evals if _finite(r.get(key)) is not None and "epoch" in r]
            if pts:
                axes[3].plot(*zip(*pts), style, color=c, marker="o", ms=3, label=f"{title}: {label}")
        mids = [(r["epoch"], r["rel_bias_mean"]) for r in evals
                if _finite(r.get("rel_bias_mean")) is not None and "epoch" in r]
        if mids:
            axes[2].plot(*zip(*mids), "o", color=c, ms=4, mfc="none", label=f"{title}: val rel_bias_mean")
    for ax, title in zip(axes, ("train loss (per step)", "t = exp(logit_scale)", "b_rel = -logit_bias / t",
                                "val: halved mean margin and R@1")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("open-clip-sigrel demo: --siglip vs --loss sigrel (same seed, data, schedule, start)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
