"""synth's two protocol switches (the authors' clipped loss, in-loss normalisation), its experiments' variants
and its input validation (every numeric flag, the output directory, nothing half-written)."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from open_clip_sigrel.cli import main as cli_main
from open_clip_sigrel.loss import batched_sigrel_loss
from open_clip_sigrel.loss.kernel import AUTHORS_EPS, batched_pair_loss
from open_clip_sigrel.tools import synth
from open_clip_sigrel.tools.synth import RunSpec, SynthConfig, build_batches, run_experiment, train_runs


def _inputs(r=3, n=9, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(r, n, d, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(r, n, d, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.tensor([0.5, 20.0, 100.0][:r], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.4, 0.3, 0.7][:r], dtype=torch.float64, requires_grad=True)
    return x, y, t, b


def _authors_direct(x, y, t, b, literal: bool = True):
    """The authors' terms in float64, mean over N^2: literally -log(1 - sigmoid(z) + 1e-8) for negatives,
    or (literal=False) with 1 - sigmoid(z) written sigmoid(-z), equal in exact arithmetic."""
    out = []
    for r in range(x.shape[0]):
        z = t[r] * (x[r] @ y[r].T - b[r])
        s = torch.sigmoid(z)
        eye = torch.eye(x.shape[1], dtype=torch.bool)
        neg = 1 - s if literal else torch.sigmoid(-z)
        out.append(torch.where(eye, -torch.log(s + 1e-8), -torch.log(neg + 1e-8)).mean())
    return torch.stack(out)


def test_authors_form_equals_direct_float64_value_and_gradient() -> None:
    x, y, t, b = _inputs()
    n = x.shape[1]
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    got = batched_pair_loss(x, y, t, b, n * n, form="authors")
    # the terms without the cancellation: equal to float64 rounding, value and gradient
    want = _authors_direct(x, y, t, b, literal=False)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    g_got = torch.autograd.grad((got * w).sum(), [x, y, t, b], retain_graph=True)
    for a, c in zip(g_got, torch.autograd.grad((want * w).sum(), [x, y, t, b])):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)
    # the literal 1 - sigmoid(z) loses ~1e-16 absolutely, which eps = 1e-8 magnifies to ~1e-8 in the gradient
    literal = _authors_direct(x, y, t, b)
    torch.testing.assert_close(got, literal, rtol=1e-10, atol=1e-10)
    for a, c in zip(g_got, torch.autograd.grad((literal * w).sum(), [x, y, t, b])):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    # the clipping: a pair wrong by a logit of 100 costs -log(eps) and has no gradient; the exact loss ~100
    z = torch.tensor([[[-1.0]]], dtype=torch.float64)
    one = torch.ones((1,), dtype=torch.float64)
    clipped = batched_pair_loss(z.new_ones((1, 1, 1)), z.new_ones((1, 1, 1)), 100 * one, 2 * one, 1.0, form="authors")
    assert float(clipped) == pytest.approx(-math.log(math.exp(-100) + AUTHORS_EPS), rel=1e-12)
    exact = batched_sigrel_loss(z.new_ones((1, 1, 1)), z.new_ones((1, 1, 1)), 100 * one, 2 * one, normalize="sum")
    assert float(exact) == pytest.approx(100.0, rel=1e-12)


def test_exact_form_is_batched_sigrel_loss_bit_for_bit() -> None:
    x, y, t, b = _inputs()
    a = batched_pair_loss(x, y, t, b, 81.0, form="exact")
    c = batched_sigrel_loss(x, y, t, b, normalize="pairs")
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="loss form must be one of exact, authors"):
        batched_pair_loss(x, y, t, b, 81.0, form="clipped")


@pytest.mark.parametrize("form", ["exact", "authors"])
def test_in_loss_normalisation_gives_the_tangent_gradient_of_autograd_through_normalize(form: str) -> None:
    x, y, t, b = _inputs()
    n = x.shape[1]
    got = batched_pair_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t, b, n * n, form=form).sum()
    gx, gy = torch.autograd.grad(got, [x, y])
    for g, f in ((gx, x), (gy, y)):  # no radial component
        assert float((g * f.detach()).sum(-1).abs().max()) < 1e-12
    # the same gradient as plain autograd through F.normalize of a direct float64 loss
    if form == "authors":
        direct = _authors_direct(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t, b).sum()
    else:
        lab = 2 * torch.eye(n, dtype=torch.float64) - 1
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        direct = sum(-F.logsigmoid(lab * t[r] * (xn[r] @ yn[r].T - b[r])).mean() for r in range(3))
    dx, dy = torch.autograd.grad(direct, [x, y])
    torch.testing.assert_close(gx, dx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gy, dy, rtol=1e-6, atol=1e-6)
    # without it, the gradient keeps its radial part (the source of the trajectory difference)
    raw = torch.autograd.grad(batched_pair_loss(x, y, t, b, n * n, form=form).sum(), [x])[0]
    assert float((raw * x.detach()).sum(-1).abs().max()) > 1e-3


def test_in_loss_normalisation_changes_the_trajectory_not_the_starting_loss() -> None:
    specs = [RunSpec("a", t0=10.0, b_rel0=0.3, seed=2)]
    kw = dict(n=20, dim=5, record_every=10, keep_similarities=False)
    on = train_runs(specs, steps=30, in_loss_normalize=True, **kw)[0]
    off = train_runs(specs, steps=30, in_loss_normalize=False, **kw)[0]
    assert on["curves"]["loss"][0] == off["curves"]["loss"][0]
    assert on["curves"]["margin"][0] == off["curves"]["margin"][0]
    assert abs(on["final"]["margin"] - off["final"]["margin"]) > 1e-4
    assert abs(on["final"]["loss"] - off["final"]["loss"]) > 1e-6 * on["final"]["loss"]


def test_clipped_loss_keeps_fixed_t100_from_separating_exact_separates() -> None:
    specs = [RunSpec(f"s{s}", t0=100.0, b_rel0=0.0, train_t=False, seed=s) for s in range(2)]
    kw = dict(n=30, dim=8, steps=300, record_every=300, keep_similarities=False)
    exact = train_runs(specs, loss_form="exact", **kw)
    clipped = train_runs(specs, loss_form="authors", **kw)
    for e, c in zip(exact, clipped):
        assert e["final"]["margin"] > 0.02, e["final"]
        assert c["final"]["margin"] < -0.2, c["final"]
        assert c["final"]["t"] == pytest.approx(100.0)
        assert c["final"]["loss"] < -math.log(AUTHORS_EPS)  # the reported loss is the clipped one


# ---------------------------------------------------------------- experiments' variants, columns
def test_frozen_fixed_t_freezes_b_rel_from_b0_over_fixed_t() -> None:
    (batch,) = build_batches("frozen", b0=[5.0], fixed_t=50.0, t0=10.0)
    spec = {s.group: s for s in batch.specs}
    assert set(spec) == {"relative", "absolute", "fixed t"}
    fixed = spec["fixed t"]
    assert not fixed.train_t and not fixed.train_b and fixed.t0 == 50.0 and fixed.b_rel0 == pytest.approx(0.1)
    assert spec["relative"].b_rel0 == pytest.approx(0.5) and spec["absolute"].logit_bias0 == pytest.approx(-5.0)
    assert all(not s.train_u for s in batch.specs)
    res = train_runs([fixed], n=12, dim=4, steps=20, keep_similarities=False)[0]
    assert res["final"]["b_rel"] == pytest.approx(0.1, abs=1e-7) and res["final"]["t"] == pytest.approx(50.0)


def test_xi_fixes_b_rel_and_modalities_has_three_variants() -> None:
    for batch in build_batches("xi", dims=[3, 5]):
        assert all(not s.train_b and s.b_rel0 == 0.0 for s in batch.specs)
    batches = build_batches("modalities", ks=[3], graphs=["star"], fixed_t=20.0)
    variants = {s.info["variant"]: s for s in batches[0].specs}
    assert set(variants) == set(synth.VARIANTS)
    assert variants["absolute"].kind == "abs" and not variants["fixed t"].train_t and variants["fixed t"].t0 == 20.0
    only = build_batches("modalities", ks=[2], variants=["relative"])
    assert [s.info["variant"] for s in only[0].specs] == ["relative"]


def test_console_and_json_report_halved_margin_and_gap(tmp_path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli_main(["synth", "fixed-rel-bias", "--output", str(tmp_path), "--n", "12", "--dim", "4", "--steps", "10",
                       "--rel-biases", "0.2", "--no-plots"])
    assert rc == 0
    assert "m* (halved)" in out.getvalue() and "gap (2m*)" in out.getvalue()
    doc = json.loads((tmp_path / "summary.json").read_text())
    f = doc["runs"][0]["final"]
    assert f["gap"] == pytest.approx(f["min_pos"] - f["max_neg"]) and f["gap"] == pytest.approx(2 * f["margin"])
    assert "gap" in doc["config"]["columns"] and doc["config"]["in_loss_normalize"] is True


def test_protocol_flags_and_per_experiment_help() -> None:
    from open_clip_sigrel.cli import build_parser
    from open_clip_sigrel.cli._fields import config_from_args

    parse = build_parser(["synth"]).parse_args
    cfg = config_from_args(SynthConfig, parse(["synth", "xi", "--output", "o", "--loss-form", "authors",
                                               "--no-in-loss-normalize"]))
    assert cfg.loss_form == "authors" and cfg.in_loss_normalize is False
    cfg = config_from_args(SynthConfig, parse(["synth", "xi", "--output", "o", "--in-loss-normalize"]))
    assert cfg == SynthConfig()
    for name, present, absent in (("xi", "--dims", "--t0s"), ("init-grid", "--t0s", "--dims"),
                                  ("modalities", "--ks", "--b0")):
        buf = io.StringIO()
        with redirect_stdout(buf), pytest.raises(SystemExit):
            cli_main(["synth", name, "--help"])
        text = buf.getvalue()
        assert synth.EXPERIMENTS[name].description.split(" (")[0][:30] in text.replace("\n", " ").replace("  ", " ")
        assert present in text and absent not in text and "--loss-form" in text


# ---------------------------------------------------------------- bad input: an error before any work
_INT_FLAGS = {"n": "fixed-rel-bias", "dim": "fixed-rel-bias", "steps": "fixed-rel-bias", "seed": "fixed-rel-bias",
              "repeats": "fixed-rel-bias", "record-every": "fixed-rel-bias", "threads": "fixed-rel-bias",
              "ks": "modalities", "dims": "xi"}
_FLOAT_FLAGS = {"lr": "fixed-rel-bias", "t0": "fixed-rel-bias", "b0": "bias-vs-rel", "rel-biases": "fixed-rel-bias",
                "t-values": "fixed-t", "b-rel0": "fixed-t", "t0s": "init-grid", "b-rel0s": "init-grid",
                "fixed-t": "frozen"}
_VALUES = ("nan", "inf", "-inf", "0", "-1", "1e300", "1e-300", "1e40")
# values that are legitimate for a flag (a bias may be 0, negative or tiny; a seed / step / thread count 0)
_VALID = {"steps": {"0"}, "seed": {"0"}, "threads": {"0"},
          **{name: {"0", "-1", "1e-300"} for name in ("b0", "rel-biases", "b-rel0", "b-rel0s")}}
_CASES = [(flag, exp, v) for flags in (_INT_FLAGS, _FLOAT_FLAGS) for flag, exp in flags.items() for v in _VALUES
          if v not in _VALID.get(flag, set())]


@pytest.mark.parametrize("flag, experiment, value", _CASES)
def test_every_numeric_flag_rejects_bad_values_before_work(flag: str, experiment: str, value: str, tmp_path,
                                                           monkeypatch) -> None:
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(synth, "train_runs", no_training)
    out = tmp_path / "out"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            rc = cli_main(["synth", experiment, "--output", str(out), "--no-plots", f"--{flag}", value])
        except SystemExit as exc:  # argparse: "invalid int value"
            rc = exc.code
    assert rc == 2, (flag, value, err.getvalue())
    assert "error:" in err.getvalue() and (flag.replace("-", "_") in err.getvalue() or flag in err.getvalue())
    assert not out.exists()


def test_the_fuzz_harness_reaches_training_with_valid_values(tmp_path, monkeypatch) -> None:
    """Control for the test above: the same call with valid values does get to training."""
    monkeypatch.setattr(synth, "train_runs", lambda *a, **k: pytest.fail("training started"))
    for flag, experiment in {**_INT_FLAGS, **_FLOAT_FLAGS}.items():
        value = {"ks": "3", "dims": "3", "repeats": "1", "n": "10", "dim": "3"}.get(flag, "1")
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), pytest.raises(pytest.fail.Exception):
            cli_main(["synth", experiment, "--output", str(tmp_path / "o"), "--no-plots", f"--{flag}", value])


@pytest.mark.parametrize("value", ["0", "-3", "nan", "2000"])
def test_report_seeds_rejected_before_work(value: str, tmp_path) -> None:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            rc = cli_main(["synth", "report", "--output", str(tmp_path / "r"), "--seeds", value, "--no-plots"])
        except SystemExit as exc:
            rc = exc.code
    assert rc == 2 and "error:" in err.getvalue() and "seeds" in err.getvalue()
    assert not (tmp_path / "r").exists()


def test_unwritable_output_fails_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(synth, "train_runs", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "sub"):
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            rc = cli_main(["synth", "xi", "--output", str(target), "--dims", "3", "--steps", "1", "--no-plots"])
        assert rc == 2 and "error: --output" in err.getvalue() and "not a directory" in err.getvalue()
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            rc = cli_main(["synth", "report", "--output", str(target), "--seeds", "1", "--no-plots"])
        assert rc == 2 and "error: --output" in err.getvalue()
    assert blocker.read_text() == "x"


def test_a_failing_plot_leaves_nothing_written(tmp_path, monkeypatch) -> None:
    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "plot_histograms", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_experiment("xi", output=str(tmp_path), n=10, dim=3, steps=3, dims=[3])
    assert list(tmp_path.iterdir()) == []  # no summary.json, no curves.png, no temporaries


def test_library_checks_match_the_cli() -> None:
    for kwargs, message in ((dict(t0=0.0), "t0"), (dict(b_rel0=math.nan), "b_rel0 must be finite"),
                            (dict(repeats=0), "repeats"), (dict(lr=math.inf), "lr must be finite"),
                            (dict(t_values=(1e40,)), "t_values"), (dict(lr=1e-300), "lr must be > 0 in float32"),
                            (dict(dims=()), "dims needs at least one value"), (dict(threads=-2), "threads"),
                            (dict(backend="loop", loss_form="authors"), "backend 'loop'"),
                            (dict(variants=("both",)), "variants")):
        with pytest.raises(ValueError, match=message):
            SynthConfig(**kwargs)
    with pytest.raises(ValueError, match="t0 of run"):
        train_runs([RunSpec("x", t0=1e30)], steps=1)
