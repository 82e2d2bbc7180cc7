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


# What may differ between the two runs: the loss choice, the run's name, the --sigrel-* settings
# (filled in for --loss sigrel only) and paths that contain the run's name.
LOSS_KEYS = {"loss", "siglip", "name"}


def _differing(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_built_argv_parses_to_the_intended_runs(digits_data, tmp_path):
    """The demo's argv, read by the real training parser: one loss each, the same data, schedule and init."""
    from open_clip_sigrel.cli.train import parse_args

    config = demo.DemoConfig(epochs=3, batch_size=16, lr=2e-3, warmup=7, wd=0.1, seed=5, workers=0)
    parsed = {name: parse_args(demo.training_argv(flags, digits_data, config, logs=tmp_path, name=name))
              for name, flags, _ in demo.RUNS}
    sig, rel = vars(parsed["siglip"]), vars(parsed["sigrel"])
    assert sig["siglip"] is True and sig["loss"] in (None, "siglip")
    assert rel["loss"] == "sigrel" and rel["siglip"] is False
    # --loss sigrel starts where open_clip's --siglip starts: t0 = 10, logit_bias0 = -10 (b_rel0 = 1).
    assert (rel["sigrel_init_logit_scale"], rel["sigrel_init_rel_bias"]) == (10.0, 1.0)
    assert not rel["sigrel_fixed_rel_bias"] and not rel["sigrel_fixed_logit_scale"]
    for args in (sig, rel):
        assert (args["train_data"], args["val_data"]) == (digits_data["train_data"], digits_data["val_data"])
        assert (args["train_num_samples"], args["val_num_samples"]) == (512, 128)
        assert args["dataset_type"] == "webdataset" and args["model"] == "sigrel-tiny"
        assert (args["epochs"], args["batch_size"], args["lr"], args["warmup"], args["wd"], args["seed"],
                args["workers"]) == (3, 16, 2e-3, 7, 0.1, 5, 0)
        assert (args["precision"], args["device"], args["logs"]) == ("fp32", "cpu", str(tmp_path))
    assert (sig["name"], rel["name"]) == ("siglip", "sigrel")
    assert LOSS_KEYS <= _differing(sig, rel) <= LOSS_KEYS | {k for k in rel if k.startswith("sigrel_")}


def _params(run_dir) -> dict[str, str]:
    """open_clip's own record of a run's settings (params.txt: 'key: value' per line)."""
    lines = (run_dir / "params.txt").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def test_runs_trained_alike_but_for_the_loss(demo_run):
    """What open_clip actually ran: the same settings but the loss, and both from t = 10, b_rel = 1."""
    output, _, _ = demo_run
    runs = output / "runs"
    sig, rel = _params(runs / "siglip"), _params(runs / "sigrel")
    assert sig["siglip"] == "True" and rel["loss"] == "sigrel" and rel["siglip"] == "False"
    assert (sig["name"], rel["name"]) == ("siglip", "sigrel")
    differing = {k for k in _differing(sig, rel) if sig.get(k, "").replace("siglip", "sigrel") != rel.get(k)}
    assert {"loss", "siglip"} <= differing <= LOSS_KEYS | {k for k in rel if k.startswith("sigrel_")}, differing
    assert sig["precision"] == "fp32" and sig["batch_size"] == "32" and sig["train_num_samples"] == "128"
    for name in ("siglip", "sigrel"):
        first = demo.train_records(runs / name)[0]  # after one step at lr / warmup: barely moved
        assert first["logit_scale"] == pytest.approx(10.0, rel=2e-3), name
        assert first["rel_bias"] == pytest.approx(1.0, abs=2e-3), name
        assert first["logit_bias"] == pytest.approx(-first["logit_scale"] * first["rel_bias"], rel=1e-4), name


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
    """Written by the training entry's own writer (hosts.telemetry.Telemetry), read back as curves."""
    import argparse

    from open_clip_sigrel.hosts.telemetry import Telemetry

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
