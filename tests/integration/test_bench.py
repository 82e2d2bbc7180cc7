"""`python benchmarks/bench.py {loss,dist,train}` at tiny sizes: every column is filled and printed.

bench loss / dist really run as the script (fresh worker processes, gloo ranks), from the checkout
and from another directory; bench train's open_clip runs take minutes on CPU, so its flags are
checked with the real training parser and its aggregation on telemetry written by a stub.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import BENCH_SCRIPT, load_bench
from open_clip.loss import SigLipLoss

bench = load_bench()
main = bench.main
REPO = BENCH_SCRIPT.parents[1]

# open_clip's main branch (not 3.3.0) has SigLipLoss(chunk_size=...); bench loss then compares it too.
OC_CHUNKED = "chunk_size" in inspect.signature(SigLipLoss).parameters
LOSS_IMPLS = ["sigrel", "open_clip"] + (["open_clip-chunked"] if OC_CHUNKED else [])
LOSS_COLUMNS = ["batch", "dim", "dtype", "impl", "time_ms", "peak_extra_MiB", "time_ratio", "mem_ratio"]
DIST_COLUMNS = ["world", "batch", "dim", "impl", "dist_impl", "time_ms", "peak_extra_MiB", "mem_vs_first",
                "time_vs_first", "mem_ratio"]


def _script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The benchmark as a user runs it: ``python <path>/bench.py ...`` from ``cwd``."""
    proc = subprocess.run([sys.executable, str(BENCH_SCRIPT), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _header_and_rows(text: str, columns: list[str]) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0].split() == columns, lines[0]
    assert set(lines[1]) == {"-"}, lines[1]  # format_table's rule under the header
    rows = []
    for line in lines[2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_bench_loss_tiny(tmp_path):
    out = tmp_path / "loss.json"
    captured = _script("loss", "--batch", "64,128", "--dim", "16", "--repeats", "2", "--json", "--output", str(out),
                       cwd=REPO)
    doc = json.loads(captured.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["columns"] == LOSS_COLUMNS
    assert [(r["batch"], r["impl"]) for r in doc["rows"]] == [(b, i) for b in (64, 128) for i in LOSS_IMPLS]
    assert doc["reference_impl"] == "open_clip"
    if OC_CHUNKED:
        assert "open_clip-chunked" not in doc["skipped_impls"]
    else:  # skipped, and why
        assert "chunk_size" in doc["skipped_impls"]["open_clip-chunked"]
        assert "skipped open_clip-chunked:" in captured.stderr  # --json: the reason goes to stderr
    assert "cuda" in doc["skipped_impls"]["siglip-kernel"]
    refs = {r["batch"]: r for r in doc["rows"] if r["impl"] == "open_clip"}
    for row in doc["rows"]:
        assert not row.get("error"), row.get("error")
        assert all(row[c] is not None for c in LOSS_COLUMNS if c != "mem_ratio"), row
        # at these tiny sizes open_clip's extra memory can round to 0 MiB: the ratio is then undefined
        assert (row["mem_ratio"] is None) == (refs[row["batch"]]["peak_extra_MiB"] == 0), row
        assert row["time_ms"] > 0 and row["peak_extra_MiB"] >= 0
        if row["impl"] == "open_clip":
            assert row["time_ratio"] == 1.0 and row["mem_ratio"] in (1.0, None)
    # identical inputs: every implementation computes the same loss, sigrel and open_clip-chunked per block
    for batch in (64, 128):
        losses = [r["loss"] for r in doc["rows"] if r["batch"] == batch]
        assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)
        by_impl = {r["impl"]: r for r in doc["rows"] if r["batch"] == batch}
        assert by_impl["sigrel"]["chunk_size"] == batch  # auto_chunk_size: the whole batch at this size
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["open_clip"] and env["device"] == "cpu"
    assert env["threads"] >= 1 and env["memory_method"] in ("vmhwm", "sampler", "getrusage")

    table = bench.format_report(doc)
    rows = _header_and_rows(table, LOSS_COLUMNS)
    assert len(rows) == 2 * len(LOSS_IMPLS) and all(len(r) == len(LOSS_COLUMNS) for r in rows)
    assert "environment:" in table
    assert ("skipped open_clip-chunked:" in table) == (not OC_CHUNKED)


def test_bench_dist_tiny(tmp_path):
    """From another directory: the worker and its spawned gloo ranks find the script by its path."""
    out = tmp_path / "dist.json"
    proc = _script("dist", "--world", "1,2", "--batch", "32", "--dim", "16", "--repeats", "1", "--output", str(out),
                   cwd=tmp_path)
    rows = _header_and_rows(proc.stdout, DIST_COLUMNS)
    assert [r[:5] for r in rows] == [["1", "32", "16", "sigrel", "bidir"], ["1", "32", "16", "open_clip", "bidir"],
                                     ["2", "32", "16", "sigrel", "bidir"], ["2", "32", "16", "open_clip", "bidir"]]
    # every measurement is there; a ratio may print "-" where a tiny reference peak rounds to 0
    assert all(len(r) == len(DIST_COLUMNS) and "-" not in r[:7] and "failed" not in r for r in rows)
    doc = json.loads(out.read_text())
    for row in doc["rows"]:
        assert len(row["rank_peaks_MiB"]) == row["world"] and row["time_ms"] > 0
    # against itself: 1, or undefined where a tiny world-1 peak rounds to 0 (seen with open_clip main)
    assert [r["mem_vs_first"] for r in doc["rows"][:2]] == [
        1.0 if r["peak_extra_MiB"] else None for r in doc["rows"][:2]]


def test_bench_rejects_bad_arguments(capsys):
    assert main(["loss", "--batch", "64", "--repeats", "0"]) == 2
    assert main(["loss", "--batch", "64", "--impls", "sigrel,nope"]) == 2
    assert main(["loss", "--batch", "64", "--impls", "siglip-kernel"]) == 2  # CUDA only
    assert main(["loss", "--batch", "64", "--chunk-size", "0"]) == 2
    assert "error" in capsys.readouterr().err
    if not OC_CHUNKED:  # asked for by name where open_clip lacks it: an error naming the reason
        assert main(["loss", "--batch", "64", "--impls", "open_clip-chunked"]) == 2
        assert "no chunk_size parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["loss", "--batch", "0,64"])


@pytest.mark.parametrize("which", ["loss", "train"])
def test_bench_device_cuda_without_cuda_fails_before_any_work(which, monkeypatch, capsys):
    """--device cuda on a machine without CUDA: exit 2 and a clear message; no worker, no dataset built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a GPU machine

    def no_work(*a, **kw):
        raise AssertionError("work started before the device check")

    monkeypatch.setattr(bench, "_run_worker", no_work)
    monkeypatch.setattr(bench.subprocess, "run", no_work)
    monkeypatch.setattr("open_clip_sigrel.tools.data.ensure_digits_dataset", no_work)
    argv = ["loss", "--batch", "64"] if which == "loss" else ["train", "--steps", "3"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available" in err and torch.__version__ in err


def test_open_clip_chunked_is_detected_by_signature_and_gets_sigrel_blocks(monkeypatch):
    """Where SigLipLoss takes chunk_size (open_clip main) it is benchmarked with sigrel's rows per block.

    On open_clip 3.3.0 the parameter is emulated by a subclass; the real one runs in test_bench_loss_tiny
    when the installed open_clip has it.
    """
    import open_clip.loss

    seen = []
    real = open_clip.loss.SigLipLoss
    if not OC_CHUNKED:
        class ChunkedSigLipLoss(real):
            def __init__(self, *args, chunk_size: int = 0, **kwargs):
                super().__init__(*args, **kwargs)
                seen.append(chunk_size)

        monkeypatch.setattr(open_clip.loss, "SigLipLoss", ChunkedSigLipLoss)
    assert bench.open_clip_chunked_support() is None
    assert "open_clip-chunked" not in bench.unavailable_impls("cpu")
    assert bench._loss_impls("cpu", None)[0] == ["sigrel", "open_clip", "open_clip-chunked"]
    cfg = {"batch": 96, "dim": 8, "dtype": "fp32", "chunk_size": 40}
    losses = {}
    for impl in ("open_clip", "open_clip-chunked", "sigrel"):
        step, _ = bench._loss_step({**cfg, "impl": impl}, torch.device("cpu"))
        losses[impl] = float(step())
    assert losses["open_clip-chunked"] == pytest.approx(losses["open_clip"], rel=1e-5)
    assert losses["sigrel"] == pytest.approx(losses["open_clip"], rel=1e-5)
    if not OC_CHUNKED:
        assert seen == [0, 40]  # open_clip as released (the default 0: no chunking), then chunked
    assert bench.effective_chunk_size(96, 40) == 40 and bench.effective_chunk_size(96, None) == 96


def test_peak_rss_sees_an_allocation():
    with bench.PeakRSS() as meter:
        block = torch.ones(16 << 20)  # 64 MiB, touched
        del block
    assert meter.method in ("vmhwm", "sampler", "getrusage")
    assert meter.peak_extra >= 48 << 20


def test_step_times_between_consecutive_steps():
    records = [{"step": 0, "time": 10.0}, {"step": 1, "time": 10.5}, {"step": 2, "time": 10.75},
               {"step": 8, "time": 20.0}]  # a gap (e.g. an evaluation in between) is not a step
    assert bench.step_times(records) == [0.5, 0.25]
    assert bench.step_times([]) == []


@pytest.mark.parametrize("device, precision", [("cpu", None), ("cuda", "amp_bf16")])
def test_train_runs_parse_with_the_training_parser_and_differ_only_in_the_loss(device, precision, tmp_path):
    """The flags bench train hands open-clip-sigrel-train, read by its real parser (open_clip_train's
    included): SigLipLoss vs sigrel, and otherwise one and the same run of `steps` steps, one record a step."""
    from open_clip_sigrel.cli.train import parse_args

    steps, batch = 7, 64
    runs = {loss: parse_args(bench.train_argv(loss, "/d/{0..3}.tar", steps, batch, "sigrel-tiny", str(tmp_path),
                                              "run", device=device, precision=precision))
            for loss in ("siglip", "sigrel")}
    siglip, sigrel = runs["siglip"], runs["sigrel"]
    assert siglip.siglip and siglip.loss in (None, "siglip")  # open_clip's own SigLipLoss
    assert sigrel.loss == "sigrel" and not sigrel.siglip
    a, b = vars(siglip), vars(sigrel)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith("sigrel_")}
    assert differ == {"siglip", "loss"}, {k: (a.get(k), b.get(k)) for k in differ}
    for args in runs.values():
        # one epoch of exactly `steps` full batches; step_times needs a telemetry record at every step
        assert args.epochs == 1 and args.train_num_samples == steps * batch and args.batch_size == batch
        assert args.log_every_n_steps == 1 and args.seed == 0 and args.save_frequency == 0
        assert args.dataset_type == "webdataset" and args.train_data == "/d/{0..3}.tar"
        assert args.device == device and args.model == "sigrel-tiny"
        assert (args.logs, args.name) == (str(tmp_path), "run")  # where bench train reads the telemetry
    default_precision = parse_args(["--train-data", "x"]).precision  # open_clip's default unless asked
    assert siglip.precision == (precision or default_precision)


def test_bench_train_alternates_runs_and_reports_ratio(tmp_path, monkeypatch, capsys):
    """open_clip's runs replaced by a stub that writes the telemetry with the entry's own writer:
    order, warm-up, medians and ratio."""
    import argparse

    from open_clip_sigrel.hosts.telemetry import Telemetry

    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "open_clip_sigrel.cli.train" not in cmd:  # e.g. a library probing its environment
            return real_run(cmd, **kwargs)
        loss = "siglip" if "--siglip" in cmd else "sigrel"
        calls.append(loss)
        logs, name = cmd[cmd.index("--logs") + 1], cmd[cmd.index("--name") + 1]
        (Path(logs) / name).mkdir(parents=True)
        step = 0.100 if loss == "siglip" else 0.102
        writer, now = Telemetry(argparse.Namespace(logs=logs, name=name, rank=0)), 1000.0
        for i in range(6):  # 5 step times; the first (9 s) is the warm-up
            writer.write({"step": i, "epoch": 0, "time": now, "loss": 1.0})
            now += 9.0 if i == 0 else step
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr("open_clip_sigrel.tools.data.ensure_digits_dataset",
                        lambda d: {"train_data": "/nowhere/{0..3}.tar", "train_num_samples": 2048})
    assert main(["train", "--steps", "5", "--warmup-steps", "1", "--rounds", "2", "--json"]) == 0
    assert calls == ["siglip", "sigrel", "sigrel", "siglip"]
    doc = json.loads(capsys.readouterr().out)
    siglip, sigrel = doc["rows"]
    assert (siglip["loss"], sigrel["loss"]) == ("siglip", "sigrel")
    assert siglip["measured_steps"] == sigrel["measured_steps"] == 8  # 2 runs x (5 - 1 warm-up)
    assert siglip["step_time_ms"] == pytest.approx(100.0) and sigrel["step_time_ms"] == pytest.approx(102.0)
    assert sigrel["time_ratio"] == pytest.approx(1.02)
    assert bench.format_report(doc).splitlines()[0].split() == doc["columns"]


def test_bench_train_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "open_clip_sigrel.cli.train" not in cmd:
            return real_run(cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: boom")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr("open_clip_sigrel.tools.data.ensure_digits_dataset", lambda d: {"train_data": "x"})
    assert main(["train", "--steps", "3", "--rounds", "1"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "boom" in out
