"""Issue 12: bad numbers and unwritable outputs of `demo` and `bench` are an "error:" line and exit 2
before any work, with nothing written (bounds: tests/research/test_bounds.py)."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
from _benchmarks import load_bench

from open_clip_sigrel.cli import main as cli_main
from open_clip_sigrel.io import atomic_write_text, check_writable_dir, check_writable_file

BAD = ("nan", "inf", "-inf", "0", "-1", "1e300", "1e-300")
TINY = {"--epochs": "1", "--n-train": "64", "--n-val": "16", "--batch-size": "16", "--warmup": "1"}
# (flag, value) pairs above that are valid settings (they would train), left out of the fuzz
DEMO_VALID = {("--warmup", "0"), ("--wd", "0"), ("--workers", "0"), ("--seed", "0")}


def _call(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = fn(argv)
        except SystemExit as e:  # argparse's parser.error
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


DEMO_FLAGS = ("--epochs", "--batch-size", "--lr", "--warmup", "--wd", "--n-train", "--n-val", "--workers", "--seed")
DEMO_BAD = [(f, v) for f in DEMO_FLAGS for v in BAD if (f, v) not in DEMO_VALID]


@pytest.mark.parametrize("flag,value", DEMO_BAD)
def test_demo_numeric_flags_fuzz(tmp_path, flag, value):
    args = {**TINY, "--output": str(tmp_path / "demo"), flag: value}
    rc, out, err = _call(cli_main, ["demo", "--quiet", *[a for kv in args.items() for a in kv]])
    assert rc == 2 and "error:" in err and out == "", (flag, value, rc, err)
    assert not (tmp_path / "demo").exists()


def test_demo_unwritable_output_is_found_before_the_dataset(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {**TINY, "--output": str(blocker / "demo")}
    rc, out, err = _call(cli_main, ["demo", "--quiet", *[a for kv in args.items() for a in kv]])
    assert rc == 2 and "error:" in err and "--output" in err and "not a directory" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


BENCH_CASES = [
    ["dist", "--batch", "0"], ["dist", "--batch", "-3"], ["dist", "--threads", "-2"], ["dist", "--world", "0"],
    ["loss", "--batch", "0"], ["loss", "--dim", "0"], ["loss", "--dim", "1e300"], ["loss", "--dim", "nan"],
    ["loss", "--repeats", "0"], ["loss", "--repeats", "inf"], ["loss", "--warmup", "-1"], ["loss", "--dim", "99999999"],
    ["loss", "--threads", "0"], ["train", "--steps", "0"], ["train", "--batch-size", "-1"],
    ["train", "--model", "nope"], ["train", "--steps", "1e-300"],
]


@pytest.mark.parametrize("argv", BENCH_CASES, ids=" ".join)
def test_bench_bad_flags_exit_2_before_work(tmp_path, argv):
    bench = load_bench()
    out_file = tmp_path / "res.json"
    rc, out, err = _call(bench.main, [*argv, "--output", str(out_file)])
    assert rc == 2 and "error:" in err and out == "", (argv, rc, err)
    assert not out_file.exists()


def test_bench_unwritable_output_before_the_run(tmp_path):
    bench = load_bench()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, out, err = _call(bench.main, ["loss", "--batch", "8", "--output", str(blocker / "res.json")])
    assert rc == 2 and "error:" in err and "--output" in err and out == ""
    rc, _, err = _call(bench.main, ["loss", "--batch", "8", "--output", str(tmp_path)])
    assert rc == 2 and "is a directory" in err


def test_bench_geometry_bad_sizes_exit_2():
    import importlib.util

    from _benchmarks import BENCH_SCRIPT

    spec = importlib.util.spec_from_file_location("bench_geometry", BENCH_SCRIPT.parent / "bench_geometry.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["--n", "0"], ["--n", "1"], ["--n", "x"], ["--dim", "0"], ["--repeats", "-1"], ["--n", "1e300"]):
        rc, out, err = _call(mod.main, argv)
        assert rc == 2 and "error:" in err and out == "", argv


def test_io_helpers(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing created
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_writable_dir(tmp_path / "f" / "sub")
    with pytest.raises(ValueError, match="is a directory"):
        check_writable_file(tmp_path)
    with pytest.raises(ValueError, match="empty path"):
        check_writable_dir("")
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").read_text() == "{}\n" and sorted(os.listdir(tmp_path)) == ["a.json", "f"]
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "a.json", "x")
