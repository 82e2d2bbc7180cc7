"""Every numeric flag of `eval` and `make-data` is checked before any work, and unwritable outputs are
found before the work (issue 12 items 10 and 13): an ``error:`` line, exit code 2, nothing written."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from open_clip_sigrel.cli import main

FUZZ = ("nan", "inf", "-inf", "0", "-1", "-5", "1e30", "1e-30", "0.5", str(10**30), "abc")
EVAL_FLAGS = ("--batch-size", "--workers", "--chunk-size", "--max-samples")
MAKE_DATA_FLAGS = ("--n-train", "--n-val", "--digits-per-image", "--image-size", "--shard-size", "--seed")
# values a flag legitimately takes: 0 workers / 0 val samples, and any seed or limit that is an int in range
VALID = {("--workers", "0"), ("--n-val", "0"), ("--seed", "0"), ("--max-samples", str(10**30))}


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture()
def emb(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "emb.npz"
    np.savez(path, image=rng.normal(size=(6, 4)), text=rng.normal(size=(6, 4)))
    return path


@pytest.mark.parametrize("flag", EVAL_FLAGS)
def test_eval_numeric_flags_fuzz(flag, emb, tmp_path, capsys):
    out = tmp_path / "out.json"
    for value in FUZZ:
        if (flag, value) in VALID:
            continue
        rc, err = _run(["eval", "--embeddings", str(emb), flag, value, "--output", str(out)], capsys)
        assert rc == 2 and "error:" in err, (flag, value, rc, err)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], (flag, value)


@pytest.mark.parametrize("flag", MAKE_DATA_FLAGS)
def test_make_data_numeric_flags_fuzz(flag, tmp_path, capsys):
    out = tmp_path / "data"
    for value in FUZZ:
        if (flag, value) in VALID:
            continue
        rc, err = _run(["make-data", "--output", str(out), "--n-train", "4", "--n-val", "2", flag, value], capsys)
        assert rc == 2 and "error:" in err, (flag, value, rc, err)
        assert not out.exists() and not list(tmp_path.iterdir()), (flag, value)


def test_make_data_huge_image_size_is_a_range_error(tmp_path, capsys):
    rc, err = _run(["make-data", "--output", str(tmp_path / "d"), "--image-size", "100000"], capsys)
    assert rc == 2 and "image_size must be <= 1024" in err
    assert not list(tmp_path.iterdir())


needs_permissions = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                       reason="root writes into read-only folders")


def _readonly(folder):
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return folder


def _unwritable(tmp_path):
    """A folder this process cannot write in: read-only (as non-root) or under a regular file (any user)."""
    if os.name == "posix" and os.geteuid() != 0:
        return _readonly(tmp_path / "ro")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker


def test_make_data_unwritable_output_fails_before_rendering(tmp_path, capsys, monkeypatch):
    import open_clip_sigrel.tools.data as data

    rendered = []
    monkeypatch.setattr(data, "_load_digits", lambda: rendered.append(1) or (_ for _ in ()).throw(AssertionError))
    target = _unwritable(tmp_path) / "digits"
    rc, err = _run(["make-data", "--output", str(target), "--n-train", "4", "--n-val", "2"], capsys)
    assert rc == 2 and "error: --output" in err and not rendered


def test_eval_unwritable_output_and_plots_fail_before_work(emb, tmp_path, capsys, monkeypatch):
    import open_clip_sigrel.cli.evaluate as cli

    called = []
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: called.append(1))
    bad = _unwritable(tmp_path)
    rc, err = _run(["eval", "--embeddings", str(emb), "--output", str(bad / "o.json")], capsys)
    assert rc == 2 and "error: --output" in err
    rc, err = _run(["eval", "--embeddings", str(emb), "--output", str(tmp_path / "o.json"),
                    "--plots", str(bad / "plots")], capsys)
    assert rc == 2 and "error: --plots" in err
    assert not called and not (tmp_path / "o.json").exists()


def test_eval_leaves_no_plots_when_the_json_cannot_be_written(emb, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import open_clip_sigrel.cli.evaluate as cli

    def refuse(result, path):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "save_result", refuse)
    plots = tmp_path / "plots"
    rc, err = _run(["eval", "--embeddings", str(emb), "--output", str(tmp_path / "o.json"), "--plots", str(plots)],
                   capsys)
    assert rc == 2 and "disk full" in err
    assert not plots.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("arrays, match", [
    ({"image": np.array([["a", "b"], ["c", "d"]]), "text": np.eye(2)}, "numeric array"),
    ({"image": np.zeros(2, dtype=[("a", "f4"), ("b", "f4")]), "text": np.eye(2)}, "numeric array"),
    ({"image": np.zeros((2, 2, 2)), "text": np.eye(2)}, "2-D"),
    ({"image": np.eye(3), "text": np.eye(2)}, "same shape"),
    ({"image": np.array([[np.nan, 1.0], [0.0, 1.0]]), "text": np.eye(2)}, "NaN or Inf"),
])
def test_eval_malformed_embeddings_are_error_lines(arrays, match, tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    rc, err = _run(["eval", "--embeddings", str(path), "--output", str(tmp_path / "o.json")], capsys)
    assert rc == 2 and err.startswith("error:") and match in err, err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_eval_extreme_scales_give_the_unit_rows_metrics(scale, tmp_path, capsys):
    import json

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    for name, (a, b) in (("unit", (x, y)), ("scaled", (x * scale, y * scale))):
        np.savez(tmp_path / f"{name}.npz", image=a, text=b)
        assert main(["eval", "--embeddings", str(tmp_path / f"{name}.npz"), "--output",
                     str(tmp_path / f"{name}.json")]) == 0
    unit = json.loads((tmp_path / "unit.json").read_text())["metrics"]
    scaled = json.loads((tmp_path / "scaled.json").read_text())["metrics"]
    for k in ("margin_worst", "image_to_text_R@1", "xi", "text_to_image_mean_rank"):
        assert scaled[k] == pytest.approx(unit[k], rel=1e-12, abs=1e-14), k
    assert unit["image_to_text_R@1"] < 1.0  # random pairs: not the degenerate all-ties answer
