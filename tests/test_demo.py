"""`open-clip-sigrel demo`: both runs train end to end (tiny settings) and are reported side by side."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from open_clip_sigrel.cli import main
from open_clip_sigrel.tools import demo

TINY = ["--epochs", "1", "--n-train", "128", "--n-val", "64", "--batch-size", "32", "--warmup", "2"]
ROW_KEYS = ("train_loss", "logit_scale", "rel_bias", "logit_bias", "image_to_text_R@1", "text_to_image_R@1",
            "margin_mean", "margin_trimmed", "gap_l2m", "linear_separability")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One real demo (two open_clip trainings of 4 steps each), printed as JSON."""
    output = tmp_path_factory.mktemp("demo") / "out"
    code, out, err = _cli(["demo", "--output", str(output), *TINY, "--json"])
    assert code == 0, err
    return output, out, err


def test_json_document_has_both_runs(demo_run):
    output, out, err = demo_run
    doc = json.loads(out)  # stdout holds the JSON document and nothing else
    assert set(doc["runs"]) == {"siglip", "sigrel"}
    for name, row in doc["runs"].items():
        for key in ROW_KEYS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
        assert row["epochs_trained"] == 1 and len(row["history"]) == 1
        assert 0.0 <= row["image_to_text_R@1"] <= 1.0
        assert row["logit_scale"] > 0
        # b_rel = -logit_bias / t in both conventions (the --siglip row is derived from its bias).
        assert row["rel_bias"] == pytest.approx(-row["logit_bias"] / row["logit_scale"], rel=1e-4, abs=1e-6)
        # Four steps from t0 = 10, b_rel0 = 1 cannot move far.
        assert row["logit_scale"] == pytest.approx(10.0, rel=0.05)
        assert row["rel_bias"] == pytest.approx(1.0, abs=0.05)
    s = doc["settings"]
    assert (s["epochs"], s["n_train"], s["n_val"], s["batch_size"], s["model"]) == (1, 128, 64, 32, "sigrel-tiny")
    assert doc["interpretation"].count(". ") >= 1 and "b_rel" in doc["interpretation"]
    assert doc["plots"] and all((output / p).is_file() for p in doc["plots"])
    assert json.loads((output / "summary.json").read_text())["runs"].keys() == doc["runs"].keys()
    assert "[demo siglip]" in err and "[demo sigrel]" in err  # progress goes to stderr


def test_runs_differ_only_in_the_loss_flags(demo_run):
    output, out, _ = demo_run
    s = json.loads(out)["settings"]
    a, b = s["argv_siglip"], s["argv_sigrel"]
    assert a[0] == "--siglip" and b[:2] == ["--loss", "sigrel"]
    a, b = a[1:], b[2:]
    name = a.index("--name")
    assert a[name + 1] == "siglip" and b[name + 1] == "sigrel"
    assert a[:name] + a[name + 2:] == b[:name] + b[name + 2:]
    assert "--seed" in a and a[a.index("--precision") + 1] == "fp32"


def test_table_prints_both_rows(demo_run):
    output, _, _ = demo_run
    code, out, err = _cli(["demo", "--output", str(output), "--report-only", "--no-plots"])
    assert code == 0, err
    header = out.splitlines()[0]
    assert "--siglip" in header and "--loss sigrel" in header
    for _, label in demo.TABLE_ROWS:
        line = next(line for line in out.splitlines() if line.startswith(label))
        values = line[len(label):].split()
        assert len(values) == 2 and all(v != "n/a" for v in values), line
    assert "chance R@1 = 1/64" in out
    assert "Val R@1" in out and str(output / "runs") in out


def test_report_only_without_runs_and_bad_flags_exit_2(tmp_path):
    code, _, err = _cli(["demo", "--output", str(tmp_path / "none"), "--report-only"])
    assert code == 2 and "no finished demo" in err
    code, _, err = _cli(["demo", "--output", str(tmp_path / "x"), "--n-train", "16", "--batch-size", "32"])
    assert code == 2 and "--n-train" in err
    assert not (tmp_path / "x").exists()  # nothing trained, nothing written


def test_train_records_read_the_runs_telemetry(tmp_path):
    """Written by the training entry's own writer (hosts.common.Telemetry), read back as curves."""
    import argparse

    from open_clip_sigrel.hosts.common import Telemetry

    (tmp_path / "run").mkdir()
    writer = Telemetry(argparse.Namespace(logs=str(tmp_path), name="run", rank=0))
    for step, loss in enumerate([9.0, 7.0, 5.0, 4.0]):  # 2 epochs of 2 steps
        writer.write({"step": step, "epoch": step // 2, "loss": loss, "logit_scale": 10.0 + step,
                      "rel_bias": 1.0 - 0.1 * step, "logit_bias": -(10.0 + step) * (1.0 - 0.1 * step), "lr": 1e-3})
    recs = demo.train_records(tmp_path / "run")
    assert [r["epoch_progress"] for r in recs] == [0.5, 1.0, 1.5, 2.0]
    assert [r["train_loss_epoch_mean"] for r in recs] == [9.0, 8.0, 5.0, 4.5]
    assert recs[-1]["logit_scale"] == 13.0 and recs[-1]["rel_bias"] == pytest.approx(0.7)


def _row(**kw):
    base = {"train_loss": 3.0, "logit_scale": 10.0, "rel_bias": 1.0, "logit_bias": -10.0,
            "image_to_text_R@1": 0.2, "text_to_image_R@1": 0.2, "margin_mean": 0.3, "rel_bias_mean": 0.5}
    return {**base, **kw}


def test_interpretation_follows_the_numbers():
    n = 512
    same = demo.interpret({"siglip": _row(rel_bias=0.99), "sigrel": _row(rel_bias=0.98)}, n_val=n)
    assert "neither moved it far" in same and "within two standard errors" in same
    assert same.count(". ") == 1 and same.endswith(".")  # two sentences
    moved = demo.interpret({"siglip": _row(rel_bias=0.99),
                            "sigrel": _row(rel_bias=0.6, **{"image_to_text_R@1": 0.4, "text_to_image_R@1": 0.4})},
                           n_val=n)
    assert "relative-bias run moved b_rel" in moved and "--loss sigrel retrieves better" in moved
    zero = demo.interpret({"siglip": _row(rel_bias=0.02), "sigrel": _row(rel_bias=0.5)}, n_val=n)
    assert "only --loss sigrel keeps b_rel away from 0" in zero
    chance = demo.interpret({"siglip": _row(**{"image_to_text_R@1": 0.002, "text_to_image_R@1": 0.0}),
                             "sigrel": _row()}, n_val=n)
    assert "--siglip stayed near chance" in chance
    missing = demo.interpret({"siglip": _row(**{"image_to_text_R@1": None}), "sigrel": _row()}, n_val=n)
    assert "not recorded" in missing


def test_table_marks_missing_values():
    table = demo.format_table({"siglip": _row(margin_trimmed=None), "sigrel": _row(margin_trimmed=0.01)}, n_val=512)
    line = next(line for line in table.splitlines() if line.startswith("val margin_trimmed"))
    assert line.split()[-2:] == ["n/a", "0.0100"]
