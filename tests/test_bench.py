"""`open-clip-sigrel bench {loss,dist,train}` at tiny sizes: every column is filled and printed.

bench loss / dist really run (fresh processes, gloo ranks); bench train's open_clip runs take
minutes on CPU, so its log parsing and aggregation are tested on captured log lines instead.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from open_clip_sigrel import bench
from open_clip_sigrel.cli import main

LOSS_COLUMNS = ["batch", "dim", "dtype", "impl", "time_ms", "peak_extra_MiB", "time_ratio", "mem_ratio"]
DIST_COLUMNS = ["world", "batch", "dim", "impl", "dist_impl", "time_ms", "peak_extra_MiB", "mem_vs_first",
                "time_vs_first", "mem_ratio"]

# Two steps as open_clip_train 3.3.0 writes them to out.log (with the plugin's Rel Bias suffix).
LOG = """\
2026-11-29,13:27:18 | INFO | Start epoch 0
2026-11-29,13:27:18 | INFO | Train Epoch: 0 [ 64/640 (10%)] Data (t): 0.580 Batch (t): 4.716, 13.5717/s, \
13.5717/s/gpu LR: 0.000200 Logit Scale: 10.000 Contrastive_loss: 9.4290 (9.4290) Loss: 9.4290 (9.4290) \
Rel Bias: 1.0000 Logit Bias: -10.0000
2026-11-29,13:27:23 | INFO | Train Epoch: 0 [128/640 (20%)] Data (t): 0.017 Batch (t): 0.251, 255.0/s, \
255.0/s/gpu LR: 0.000400 Logit Scale: 10.000 Contrastive_loss: 9.3961 (9.4126) Loss: 9.3961 (9.4126)
"""


def _header_and_rows(text: str, columns: list[str]) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0].split() == columns, lines[0]
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_bench_loss_tiny(tmp_path, capsys):
    out = tmp_path / "loss.json"
    assert main(["bench", "loss", "--batch", "64,128", "--dim", "16", "--repeats", "2", "--json",
                 "--output", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["columns"] == LOSS_COLUMNS
    assert [(r["batch"], r["impl"]) for r in doc["rows"]] == [
        (64, "sigrel"), (64, "open_clip"), (128, "sigrel"), (128, "open_clip")]
    refs = {r["batch"]: r for r in doc["rows"] if r["impl"] == "open_clip"}
    for row in doc["rows"]:
        assert not row.get("error"), row.get("error")
        assert all(row[c] is not None for c in LOSS_COLUMNS if c != "mem_ratio"), row
        # at these tiny sizes open_clip's extra memory can round to 0 MiB: the ratio is then undefined
        assert (row["mem_ratio"] is None) == (refs[row["batch"]]["peak_extra_MiB"] == 0), row
        assert row["time_ms"] > 0 and row["peak_extra_MiB"] >= 0
        if row["impl"] == "open_clip":
            assert row["time_ratio"] == 1.0 and row["mem_ratio"] in (1.0, None)
    # identical inputs: both implementations compute the same loss
    for batch in (64, 128):
        losses = [r["loss"] for r in doc["rows"] if r["batch"] == batch]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["open_clip"] and env["device"] == "cpu"
    assert env["threads"] >= 1 and env["memory_method"] in ("vmhwm", "sampler", "getrusage")

    table = bench.format_report(doc)
    rows = _header_and_rows(table, LOSS_COLUMNS)
    assert len(rows) == 4 and all(len(r) == len(LOSS_COLUMNS) for r in rows)
    assert "environment:" in table


def test_bench_dist_tiny(tmp_path, capsys):
    out = tmp_path / "dist.json"
    assert main(["bench", "dist", "--world", "1,2", "--batch", "32", "--dim", "16", "--repeats", "1",
                 "--output", str(out)]) == 0
    rows = _header_and_rows(capsys.readouterr().out, DIST_COLUMNS)
    assert [r[:5] for r in rows] == [["1", "32", "16", "sigrel", "bidir"], ["1", "32", "16", "open_clip", "bidir"],
                                     ["2", "32", "16", "sigrel", "bidir"], ["2", "32", "16", "open_clip", "bidir"]]
    # every measurement is there; a ratio may print "-" where a tiny reference peak rounds to 0
    assert all(len(r) == len(DIST_COLUMNS) and "-" not in r[:7] and "failed" not in r for r in rows)
    doc = json.loads(out.read_text())
    for row in doc["rows"]:
        assert len(row["rank_peaks_MiB"]) == row["world"] and row["time_ms"] > 0
    assert [r["mem_vs_first"] for r in doc["rows"][:2]] == [1.0, 1.0]


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "loss", "--batch", "64", "--repeats", "0"]) == 2
    assert main(["bench", "loss", "--batch", "64", "--impls", "sigrel,nope"]) == 2
    assert main(["bench", "loss", "--batch", "64", "--impls", "siglip-kernel"]) == 2  # CUDA only
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "loss", "--batch", "0,64"])


def test_peak_rss_sees_an_allocation():
    with bench.PeakRSS() as meter:
        block = torch.ones(16 << 20)  # 64 MiB, touched
        del block
    assert meter.method in ("vmhwm", "sampler", "getrusage")
    assert meter.peak_extra >= 48 << 20


def test_parse_batch_times_reads_each_train_line():
    assert bench.parse_batch_times(LOG) == [(0.580, 4.716), (0.017, 0.251)]
    assert bench.parse_batch_times("no training here\n") == []


def test_train_flags_are_the_same_for_both_losses():
    flags = bench.train_flags("/d/{0..3}.tar", 7, 64, "sigrel-tiny", "/logs", "run")
    joined = " ".join(flags)
    for expected in ("--train-num-samples 448", "--batch-size 64", "--seed 0", "--log-every-n-steps 1",
                     "--dataset-type webdataset", "--device cpu", "--model sigrel-tiny", "--name run"):
        assert expected in joined
    assert "--siglip" not in flags and "--loss" not in flags  # added per run


def test_bench_train_alternates_runs_and_reports_ratio(tmp_path, monkeypatch, capsys):
    """open_clip's runs replaced by a stub that writes out.log: order, warm-up, medians and ratio."""
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "open_clip_sigrel.train" not in cmd:  # e.g. a library probing its environment
            return real_run(cmd, **kwargs)
        loss = "siglip" if "--siglip" in cmd else "sigrel"
        calls.append(loss)
        logs, name = cmd[cmd.index("--logs") + 1], cmd[cmd.index("--name") + 1]
        (Path(logs) / name).mkdir(parents=True)
        batch = 0.100 if loss == "siglip" else 0.102
        lines = [f"Train Epoch: 0 [{i}/5] Data (t): 0.010 Batch (t): {9.0 if i == 0 else batch:.3f}, 1/s"
                 for i in range(5)]
        (Path(logs) / name / "out.log").write_text("\n".join(lines) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr("open_clip_sigrel.data.ensure_digits_dataset",
                        lambda d: {"train_data": "/nowhere/{0..3}.tar", "train_num_samples": 2048})
    assert main(["bench", "train", "--steps", "5", "--warmup-steps", "1", "--rounds", "2", "--json"]) == 0
    assert calls == ["siglip", "sigrel", "sigrel", "siglip"]
    doc = json.loads(capsys.readouterr().out)
    siglip, sigrel = doc["rows"]
    assert (siglip["loss"], sigrel["loss"]) == ("siglip", "sigrel")
    assert siglip["measured_steps"] == sigrel["measured_steps"] == 8  # 2 runs x (5 - 1 warm-up)
    assert siglip["batch_time_ms"] == pytest.approx(100.0) and sigrel["batch_time_ms"] == pytest.approx(102.0)
    assert sigrel["time_ratio"] == pytest.approx(1.02) and sigrel["compute_ratio"] == pytest.approx(92 / 90)
    assert bench.format_report(doc).splitlines()[0].split() == doc["columns"]


def test_bench_train_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "open_clip_sigrel.train" not in cmd:
            return real_run(cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: boom")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr("open_clip_sigrel.data.ensure_digits_dataset", lambda d: {"train_data": "x"})
    assert main(["bench", "train", "--steps", "3", "--rounds", "1"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "boom" in out
