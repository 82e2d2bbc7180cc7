"""`open-clip-sigrel demo`: the tiny model trained with ``--siglip`` and with ``--loss sigrel``, side by side.

Both runs go through open_clip's own training loop (``python -m open_clip_sigrel.cli.train`` in a fresh
subprocess each: open_clip's logging set-up is process-global) on the shipped digit-mosaic dataset
(``open_clip_sigrel.tools.data``, built once into a cache), with the same seed, data, schedule and starting
logits (t0 = 10, logit_bias0 = -10, i.e. b_rel0 = 1). Only the loss differs:

* ``--siglip``       open_clip's SigLipLoss with an absolute, trainable ``logit_bias``;
* ``--loss sigrel``  the relative-bias loss, logits = t * (s - b_rel) with b_rel trainable.

Afterwards the demo reads each run's last evaluation (open_clip's ``results.jsonl``, with the
plugin's geometry metrics) and its per-step training telemetry, writes plots, and returns a summary
that says in two sentences what the numbers show; ``open-clip-sigrel demo`` (open_clip_sigrel.cli.demo)
prints it as a table or, with ``--json``, as one JSON document.

Layout under ``--output`` (default ``./sigrel_demo``)::

    data/                         the dataset cache (``--data-dir``)
    runs/siglip/, runs/sigrel/    open_clip's run folders: out.log, sigrel_train.jsonl (per-step telemetry),
                                  checkpoints/results.jsonl, epoch_N.pt
    runs/<name>.console.log       everything the training subprocess printed
    comparison.png                t, b_rel, train loss, val margin and R@1 of both runs
    <name>_curves.png             open_clip_sigrel.tools.plots.plot_training_curves of each run
    summary.json                  what ``--json`` prints

The defaults (:class:`DemoConfig`: batch 32, lr 1e-3, warmup 100 steps, 6 epochs of 64 steps; fp32)
were chosen so that both runs leave the collapsed start and reach a val R@1 far above chance (1/512; about 0.16-0.20 both ways
after 6 epochs) in a few CPU minutes. The SigLIP start b_rel0 = 1 is meant for batches of ~32k: at
batch 32 the first steps pull all similarities up together until every pair scores alike (train
loss plateau ~4.45 = min over z of softplus(-z) + 31 softplus(z)) and the features separate only
later, around epoch 2. With batch 64 and warmup 5-20 steps, or lr >= 3e-3, the tiny model stayed in
that plateau for the whole run in our trials (open_clip's default ``--precision amp`` is float16
autocast on CPU and did not learn either).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_clip_sigrel.bias import rel_bias_from_logit_bias
from open_clip_sigrel.extras import require
from open_clip_sigrel.hosts.options import DEFAULT_INIT_LOGIT_SCALE, DEFAULT_INIT_REL_BIAS
from open_clip_sigrel.hosts.telemetry import TELEMETRY_FILE, read_telemetry
from open_clip_sigrel.io import check_writable_dir, read_jsonl
from open_clip_sigrel.io import format_table as _format_table
from open_clip_sigrel.tools.data import DigitsConfig, ensure_digits_dataset

__all__ = [
    "DemoConfig",
    "DemoRunError",
    "RUNS",
    "run_demo",
    "training_argv",
    "train_records",
    "summarize_run",
    "format_table",
    "interpret",
    "plot_comparison",
]

MODEL = "sigrel-tiny"
#: The two runs: name, the loss flags given to the training entry, and the table's column title.
RUNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("siglip", ("--siglip",), "--siglip"),
    ("sigrel", ("--loss", "sigrel"), "--loss sigrel"),
)
#: Starting logits shared by both runs: open_clip's --siglip init (t0 = 10, logit_bias0 = -10), which is
#: also the training entry's default for --loss sigrel (b_rel0 = -logit_bias0 / t0 = 1).
INIT_T, INIT_REL_BIAS = DEFAULT_INIT_LOGIT_SCALE, DEFAULT_INIT_REL_BIAS


_MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo: the defaults of :func:`run_demo` and of ``open-clip-sigrel demo``'s flags."""

    output: str = field(default="sigrel_demo", metadata={
        "help": "folder for the runs, plots and summary (created; earlier demo runs in it are replaced)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "dataset cache (built on first use, reused afterwards); default: OUTPUT/data"})
    epochs: int = field(default=6, metadata={"help": "training epochs of each run"})
    batch_size: int = field(default=32, metadata={"help": "batch size of each run"})
    lr: float = field(default=1e-3, metadata={
        "help": "learning rate (open_clip uses it for the weights, log t and the bias alike)"})
    warmup: int = field(default=100, metadata={"help": "linear warmup steps (then cosine decay)"})
    wd: float = field(default=0.2, metadata={"help": "weight decay (open_clip's; not on t / biases)"})
    seed: int = field(default=0, metadata={"help": "training seed, the same for both runs"})
    n_train: int = field(default=2048, metadata={"help": "training samples (digit mosaics)"})
    n_val: int = field(default=512, metadata={"help": "validation samples (retrieval among these)"})
    workers: int = field(default=1, metadata={"help": "data loader workers per run"})

    def check(self) -> None:
        """ValueError naming the flag of the first setting that cannot train."""
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if not (math.isfinite(self.lr) and 1e-12 <= self.lr <= 10):  # float32 steps: below 1e-12 nothing moves
            raise ValueError(f"--lr must be a number in [1e-12, 10], got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not (math.isfinite(self.wd) and (self.wd == 0 or 1e-12 <= self.wd <= 10)):  # tinier: 0 in float32 steps
            raise ValueError(f"--wd must be 0 or a number in [1e-12, 10], got {self.wd}")
        if self.n_train < self.batch_size:
            raise ValueError(f"--n-train ({self.n_train}) must be at least --batch-size ({self.batch_size})")
        if self.n_val < 2:
            raise ValueError(f"--n-val must be >= 2 (retrieval needs candidates), got {self.n_val}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range (open_clip seeds numpy with it)
            raise ValueError(f"--seed must be in [0, 2^32), got {self.seed}")
        for flag, value in (("--n-train", self.n_train), ("--n-val", self.n_val)):
            if value > _MAX_SAMPLES:  # the mosaics are rendered in memory
                raise ValueError(f"{flag} must be at most {_MAX_SAMPLES:,} (the demo's dataset), got {value}")


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


class DemoRunError(RuntimeError):
    """A training run failed or left no results."""


def _json_default(value: Any) -> Any:
    return str(value)


def _read_results(run_dir: Path) -> list[dict]:
    """open_clip's results.jsonl of a run; lenient, since a running training may be mid-line."""
    return read_jsonl(run_dir / "checkpoints" / "results.jsonl", strict=False, missing_ok=True)


# ------------------------------------------------------------------------------------- training


def training_argv(loss_flags: tuple[str, ...] | list[str], data: dict, config: DemoConfig, *,
                  logs: str | os.PathLike, name: str) -> list[str]:
    """The argv of ``python -m open_clip_sigrel.cli.train`` for one demo run (open_clip flags + loss flags).

    ``data`` is the dict of :func:`open_clip_sigrel.tools.data.ensure_digits_dataset`.
    """
    c = config
    return [
        *loss_flags,
        "--model", MODEL,
        "--train-data", data["train_data"],
        "--train-num-samples", str(data["train_num_samples"]),
        "--val-data", data["val_data"],
        "--val-num-samples", str(data["val_num_samples"]),
        "--dataset-type", "webdataset",
        "--batch-size", str(c.batch_size),
        "--epochs", str(c.epochs),
        "--lr", repr(float(c.lr)),
        "--warmup", str(c.warmup),
        "--wd", repr(float(c.wd)),
        # open_clip's default "amp" is float16 autocast, which on CPU is slow and loses the tiny model.
        "--precision", "fp32",
        "--workers", str(c.workers),
        "--device", "cpu",
        "--seed", str(c.seed),
        "--val-frequency", "1",
        "--log-every-n-steps", "1",  # every step: the epoch's mean loss and smooth t / b_rel curves
        "--sigrel-geometry", "full",  # the trimmed margins and separability too (512 val pairs: cheap)
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
        steps = train_records(self.run_dir, strict=False) if (self.run_dir / TELEMETRY_FILE).is_file() else []
        ends = [r for r in steps if r["epoch_progress"] == r["epoch"] + 1]
        for rec in ends[self.epochs_seen:]:
            self.progress(f"[demo {self.name}] epoch {rec['epoch'] + 1}: train loss {_fmt(rec['train_loss_epoch_mean'])}, "
                          f"t {_fmt(rec.get('logit_scale'))}, b_rel {_fmt(rec.get('rel_bias'))} "
                          f"({time.perf_counter() - self.start:.0f} s)")
        self.epochs_seen = len(ends)
        evals = _read_results(self.run_dir)
        for row in evals[self.evals_seen:]:
            self.progress(f"[demo {self.name}] val after epoch {row.get('epoch')}: R@1 image->text "
                          f"{_fmt(row.get('image_to_text_R@1'), 3)}, text->image {_fmt(row.get('text_to_image_R@1'), 3)}")
        self.evals_seen = len(evals)


def run_demo(config: DemoConfig | None = None, *, train: bool = True, plots: bool = True, progress=None,
             **options: Any) -> dict:
    """Trains (unless ``train=False``) both runs and returns the summary (what ``--json`` prints).

    The settings are ``config`` (default ``DemoConfig()``) with any of its fields given as keyword
    ``options`` on top (``run_demo(epochs=1, n_train=128)``). ``progress``: None or a callable taking
    one line of progress text. Raises ValueError on bad settings, DemoRunError when a run fails or
    left no results, ImportError when the ``data`` extra (the dataset) is missing.
    """
    cfg = dataclasses.replace(config if config is not None else DemoConfig(), **options)
    output = Path(cfg.output).expanduser().absolute()
    runs_dir = output / "runs"
    settings_path = output / "settings.json"
    start = time.perf_counter()
    walls: dict[str, float | None] = {name: None for name, _, _ in RUNS}
    if train:
        cfg.check()
        check_writable_dir(output, what="--output")  # before the dataset and the runs, not after them
        if cfg.data_dir is not None:
            check_writable_dir(Path(cfg.data_dir).expanduser().absolute(), what="--data-dir")
        data_path = Path(cfg.data_dir).expanduser().absolute() if cfg.data_dir is not None else output / "data"
        if progress is not None:
            progress(f"[demo] dataset: {data_path} ({cfg.n_train} train / {cfg.n_val} val digit mosaics)")
        data = ensure_digits_dataset(data_path, DigitsConfig(n_train=cfg.n_train, n_val=cfg.n_val, csv=False))
        settings = {
            "model": MODEL,
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output", "data_dir")},
            "precision": "fp32", "init_logit_scale": INIT_T, "init_rel_bias": INIT_REL_BIAS,
            "data_dir": str(data_path), "steps_per_epoch": cfg.n_train // cfg.batch_size,
        }
        runs_dir.mkdir(parents=True, exist_ok=True)
        settings_path.unlink(missing_ok=True)
        for name, flags, _ in RUNS:
            argv = training_argv(flags, data, cfg, logs=runs_dir, name=name)
            settings[f"argv_{name}"] = argv
            if progress is not None:
                progress(f"[demo {name}] training: python -m open_clip_sigrel.cli.train {' '.join(flags)} ... "
                         f"({cfg.epochs} epochs x {cfg.n_train // cfg.batch_size} steps)")
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


def train_records(run_dir: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """The run's structured training telemetry (sigrel_train.jsonl), one dict per logged step
    (strict=False: a run still writing, whose last line may be cut short).

    Keys: epoch, step, epoch_progress (epoch + fraction of its steps done), lr, logit_scale (t),
    rel_bias, logit_bias, train_loss (this step) and train_loss_epoch_mean (mean of the epoch's
    logged steps so far).
    """
    rows = read_telemetry(run_dir, strict=strict)
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


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize_run(run_dir: str | os.PathLike) -> dict:
    """One row of the demo: final train loss, t, b_rel, logit_bias and the last evaluation's metrics.

    t / b_rel / logit_bias come from the last evaluation when it has them (the geometry metrics,
    full precision), else from the last step of the training telemetry. ``history`` holds, per epoch, the end of
    epoch train values and that epoch's evaluation. Raises DemoRunError when the run left no log.
    """
    run_dir = Path(run_dir)
    log_path = run_dir / TELEMETRY_FILE
    if not log_path.is_file():
        raise DemoRunError(f"no training telemetry at {log_path}")
    train = train_records(run_dir)
    if not train:
        raise DemoRunError(f"{log_path} has no training step")
    results = _read_results(run_dir)
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
        rel = rel_bias_from_logit_bias(bias, t)
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
    """The side-by-side table of both runs (a row per TABLE_ROWS entry, columns in RUNS order)."""
    names = [name for name, _, _ in RUNS if name in runs]
    titles = {name: title for name, _, title in RUNS}
    table = _format_table([""] + [titles[n] for n in names],
                          [[label] + [_fmt(runs[n].get(key)) for n in names] for key, label in TABLE_ROWS])
    if n_val:
        table += (f"\n(chance R@1 = 1/{n_val} = {1 / n_val:.4f}; both runs start at t = {INIT_T:g}, "
                  f"b_rel = {INIT_REL_BIAS:g})")
    return table


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
    """comparison.png (own figure) and each run's curves (open_clip_sigrel.tools.plots); needs the plots extra."""
    written: list[Path] = []
    try:
        written.append(plot_comparison(runs_dir, output / "comparison.png"))
    except Exception as e:  # plots are a bonus: never lose the numbers over them
        if progress is not None:
            progress(f"[demo] comparison plot skipped: {e}")
    try:
        require("matplotlib", "plots")
        from open_clip_sigrel.tools.plots import plot_training_curves
    except ImportError:  # already said by the comparison plot
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
    require("matplotlib", "plots")
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
        evals = _read_results(runs_dir / name)
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
