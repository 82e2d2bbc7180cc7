"""Synthetic constellation experiments (open_clip_sigrel.tools.synth): short runs, N = 100, d = 10."""
from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from open_clip_sigrel.cli import main as cli_main
from open_clip_sigrel.loss import batched_sigrel_loss, sigrel_loss
from open_clip_sigrel.tools.synth import (
    RunSpec,
    SynthConfig,
    build_batches,
    init_embeddings,
    run_experiment,
    train_runs,
)


def _by_name(results: list[dict]) -> dict[str, dict]:
    return {r["spec"]["name"]: r["final"] for r in results}


@pytest.mark.parametrize("normalize", ["pairs", "batch", "sum"])
def test_batched_loss_matches_sigrel_loss(normalize: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(3, 9, 4, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(3, 9, 4, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.tensor([0.5, 8.0, 60.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.4, 0.1, 0.7], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    got = batched_sigrel_loss(x, y, t, b, normalize=normalize)
    want = torch.stack([sigrel_loss(x[r], y[r], t[r], b[r], normalize=normalize) for r in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * w).sum(), [x, y, t, b])
    g_want = torch.autograd.grad((want * w).sum(), [x, y, t, b])
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
    no_value = batched_sigrel_loss(x, y, t, b, normalize=normalize, compute_value=False)
    assert torch.isnan(no_value).all()
    for a, c in zip(torch.autograd.grad((no_value * w).sum(), [x, y, t, b]), g_want):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def test_batched_backend_matches_loop_backend() -> None:
    specs = [RunSpec("abs", kind="abs", b_rel0=0.5), RunSpec("rel", b_rel0=0.5),
             RunSpec("fixed", b_rel0=-0.2, train_t=False, train_b=False, train_u=False, seed=3)]
    kw = dict(n=40, dim=6, steps=40, record_every=10)
    fast = train_runs(specs, backend="batched", **kw)
    slow = train_runs(specs, backend="loop", **kw)
    for a, c in zip(fast, slow):
        for key in ("t", "b_rel", "margin", "xi"):
            assert a["final"][key] == pytest.approx(c["final"][key], rel=1e-3, abs=1e-4), key
        assert a["final"]["loss"] == pytest.approx(c["final"]["loss"], rel=1e-3)
    multi = [RunSpec("k3", b_rel0=0.2)]
    fast = train_runs(multi, k=3, graph="star", backend="batched", **kw)
    slow = train_runs(multi, k=3, graph="star", backend="loop", **kw)
    assert fast[0]["final"]["margin"] == pytest.approx(slow[0]["final"]["margin"], abs=1e-4)
    assert fast[0]["final"]["loss"] == pytest.approx(slow[0]["final"]["loss"], rel=1e-3)


def test_same_seed_same_start() -> None:
    torch.testing.assert_close(init_embeddings(7, 20, 5), init_embeddings(7, 20, 5), rtol=0, atol=0)
    (batch,) = build_batches("bias-vs-rel", SynthConfig(seed=0, repeats=1, dim=10, t0=10.0, b0=[5.0]))
    abs_spec, rel_spec = batch.specs
    assert abs_spec.logit_bias0 == -5.0 and rel_spec.b_rel0 == 0.5 and abs_spec.seed == rel_spec.seed
    res = train_runs(batch.specs, n=30, dim=4, steps=0)
    a, r = res[0]["curves"], res[1]["curves"]
    assert a["loss"][0] == pytest.approx(r["loss"][0], rel=1e-12)  # same starting logits
    assert a["b_rel"][0] == pytest.approx(0.5) and a["margin"][0] == r["margin"][0]


def test_relative_bias_stays_away_from_zero_absolute_drifts() -> None:
    specs = []
    for b0 in (0.0, 5.0):
        specs += [RunSpec(f"abs {b0}", kind="abs", b_rel0=b0 / 10), RunSpec(f"rel {b0}", b_rel0=b0 / 10)]
    fin = _by_name(train_runs(specs, steps=2000, keep_similarities=False))
    for b0 in (0.0, 5.0):
        rel, ab = fin[f"rel {b0}"]["b_rel"], fin[f"abs {b0}"]["b_rel"]
        assert rel > 0.4, (b0, rel)
        assert abs(ab) < 0.2, (b0, ab)  # logit_bias / t drifts toward 0 while t grows
        assert fin[f"rel {b0}"]["margin"] > fin[f"abs {b0}"]["margin"] > 0


def test_trainable_t_separates_fixed_t_limits() -> None:
    """Trainable t: a constellation and a vanishing loss. Fixed t = 10: the loss stays bounded away
    from 0. Fixed t = 100 with the exact loss still separates (with a smaller margin than trainable t):
    the paper's "fixed large t fails to separate" is not reproduced with -logsigmoid."""
    specs = [
        RunSpec("trained t", b_rel0=0.5, train_b=False),
        RunSpec("t=10", t0=10.0, b_rel0=0.5, train_t=False, train_b=False),
        RunSpec("t=100", t0=100.0, b_rel0=0.5, train_t=False, train_b=False),
    ]
    fin = _by_name(train_runs(specs, steps=2000, keep_similarities=False))
    assert fin["trained t"]["margin"] > 0.1
    assert fin["trained t"]["t"] > 30
    assert fin["t=10"]["loss"] > 1e-3 > 1e-4 > fin["trained t"]["loss"]
    assert fin["t=100"]["margin"] > 0  # separates
    assert fin["t=100"]["margin"] < fin["trained t"]["margin"]
    assert fin["t=100"]["t"] == pytest.approx(100.0) and fin["t=10"]["b_rel"] == pytest.approx(0.5)


def test_frozen_modality_relative_beats_fixed_t() -> None:
    specs = [RunSpec("rel", b_rel0=0.0, train_u=False), RunSpec("abs", kind="abs", b_rel0=0.0, train_u=False),
             RunSpec("fixed t", b_rel0=0.0, train_t=False, train_u=False)]
    res = train_runs(specs, steps=1500, keep_similarities=False, keep_features=True)
    fin = _by_name(res)
    assert fin["rel"]["loss"] < fin["fixed t"]["loss"]
    assert fin["rel"]["loss"] < fin["abs"]["loss"]
    assert fin["rel"]["margin"] > 0
    start = init_embeddings(0, 100, 10)
    for r in res:  # the frozen tower did not move at all
        torch.testing.assert_close(r["features"][0], start[0], rtol=0, atol=0)
        assert not torch.equal(r["features"][1], start[1])


def test_modalities_share_scalars() -> None:
    res = train_runs([RunSpec("k4", b_rel0=0.3)], k=4, graph="complete", n=30, dim=8, steps=300)
    fin = res[0]["final"]
    assert res[0]["pos"].numel() == 6 * 30 and res[0]["neg"].numel() == 6 * 30 * 29
    assert fin["loss"] < res[0]["curves"]["loss"][0]
    with pytest.raises(ValueError, match="graph"):
        train_runs([RunSpec("x")], k=3, graph="ring", steps=1)
    with pytest.raises(ValueError, match="2 modalities"):  # loss.graph_edges' message
        train_runs([RunSpec("x")], k=1, steps=1)


def test_run_experiment_writes_outputs(tmp_path) -> None:
    out = tmp_path / "bvr"
    summary = run_experiment("bias-vs-rel", output=str(out), n=40, dim=6, steps=200, record_every=50, b0=[0.0, 10.0])
    for name in ("summary.json", "curves.json", "curves.png", "histograms.png"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["experiment"] == "bias-vs-rel" and doc["seeds"] == [0]
    assert len(doc["runs"]) == 4 and {r["kind"] for r in doc["runs"]} == {"abs", "rel"}
    for run in doc["runs"]:
        assert {"loss", "t", "b_rel", "margin", "b_star", "xi", "logit_bias"} <= set(run["final"])
        assert run["seed"] == 0
    assert doc["config"]["steps"] == 200 and summary["runs"][0]["final"] == doc["runs"][0]["final"]
    curves = json.loads((out / "curves.json").read_text())
    assert curves["runs"][0]["step"] == [0, 50, 100, 150, 200]
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")


@pytest.mark.parametrize("experiment", ["fixed-rel-bias", "fixed-t", "init-grid", "frozen", "modalities", "xi"])
def test_every_experiment_builds_and_runs(experiment: str, tmp_path) -> None:
    extra = {"modalities": dict(ks=[2, 3], graphs=["complete", "star"]), "xi": dict(dims=[3, 6]),
             "fixed-rel-bias": dict(rel_biases=[0.0, 0.5])}.get(experiment, {})
    summary = run_experiment(experiment, output=str(tmp_path), plots=False, n=20, dim=4, steps=20,
                             record_every=10, **extra)
    assert summary["runs"] and os.path.exists(tmp_path / "summary.json")
    if experiment == "modalities":
        variants = ["relative", "absolute", "fixed t"]
        assert [(r["k"], r["graph"], r["info"]["variant"]) for r in summary["runs"]] == [
            (k, g, v) for k, g in [(2, "complete"), (3, "complete"), (3, "star")] for v in variants]
    if experiment == "xi":
        assert [r["dim"] for r in summary["runs"]] == [3, 6]


def test_cli_json_prints_one_document(tmp_path) -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["synth", "fixed-rel-bias", "--output", str(tmp_path), "--n", "20", "--dim", "4",
                       "--steps", "30", "--rel-biases", "0.0", "0.8", "--no-plots", "--json"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert [r["final"]["b_rel"] for r in doc["runs"]] == pytest.approx([0.0, 0.8])
    assert all(not r["train_b"] for r in doc["runs"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["synth", "bias-vs-rel", "--output", str(tmp_path / "t"), "--n", "20", "--dim", "4",
                       "--steps", "10", "--b0", "0", "--no-plots"])
    assert rc == 0 and "abs b0=0" in buf.getvalue() and "rel b0=0" in buf.getvalue()


# ---------------------------------------------------------------- formulas against float64, configuration, side effects
def _direct_geometry(feats: torch.Tensor, edges: list[tuple[int, int]]) -> dict[str, float]:
    """m*, b*_rel, xi of one run's (k, n, d) embeddings, written out in float64."""
    f = feats.double()
    pos, neg, xis = [], [], []
    for a, c in edges:
        s = f[a] @ f[c].T
        off = ~torch.eye(s.shape[0], dtype=torch.bool)
        pos.append(s.diagonal().min())
        neg.append(s[off].max())
        diff = f[a] - f[c]
        xis.append(((diff - diff.mean(0)) ** 2).sum(1).mean())
    p, q = float(min(pos)), float(max(neg))
    return {"margin": (p - q) / 2, "b_star": (p + q) / 2, "xi": float(sum(xis) / len(xis)), "min_pos": p, "max_neg": q}


@pytest.mark.parametrize("k, graph, edges", [(2, "complete", [(0, 1)]), (3, "star", [(0, 1), (0, 2)]),
                                             (3, "complete", [(0, 1), (0, 2), (1, 2)])])
def test_reported_geometry_and_loss_match_float64(k: int, graph: str, edges: list) -> None:
    specs = [RunSpec("rel", t0=7.0, b_rel0=0.3, seed=4), RunSpec("abs", kind="abs", t0=3.0, b_rel0=-0.2, seed=5)]
    res = train_runs(specs, n=12, dim=5, steps=0, k=k, graph=graph, keep_features=True)
    for spec, item in zip(specs, res):
        start = init_embeddings(spec.seed, 12, 5, k)
        torch.testing.assert_close(item["features"], start, rtol=0, atol=0)
        want = _direct_geometry(start, edges)
        for key, value in want.items():
            assert item["final"][key] == pytest.approx(value, abs=2e-6), key  # float32 embeddings
        f = start.double()
        labels = 2 * torch.eye(12, dtype=torch.float64) - 1
        dense = sum(-F.logsigmoid(labels * spec.t0 * (f[a] @ f[c].T - spec.b_rel0)).mean() for a, c in edges)
        assert item["final"]["loss"] == pytest.approx(float(dense) / len(edges), rel=1e-6)
        assert item["final"]["t"] == pytest.approx(spec.t0, rel=1e-6)
        assert item["final"]["b_rel"] == pytest.approx(spec.b_rel0, abs=1e-6)  # abs: -logit_bias / t
        assert item["final"]["logit_bias"] == pytest.approx(-spec.t0 * spec.b_rel0, abs=1e-5)


def test_parser_and_signature_defaults_are_synthconfig() -> None:
    import inspect
    from dataclasses import fields

    from open_clip_sigrel.cli import build_parser
    from open_clip_sigrel.cli._fields import config_from_args

    parse = build_parser(["synth"]).parse_args
    assert config_from_args(SynthConfig, parse(["synth", "xi", "--output", "o"])) == SynthConfig()
    cfg = config_from_args(SynthConfig, parse(["synth", "modalities", "--output", "o", "--record-every", "7",
                                               "--graphs", "star", "--normalize", "sum", "--threads", "0"]))
    assert cfg == SynthConfig(record_every=7, graphs=("star",), normalize="sum", threads=0)
    cfg = config_from_args(SynthConfig, parse(["synth", "frozen", "--output", "o", "--b0", "1", "2"]))
    assert cfg == SynthConfig(b0=(1.0, 2.0))
    defaults = {f.name: f.default for f in fields(SynthConfig)}
    for name, param in inspect.signature(train_runs).parameters.items():
        if name in defaults:
            assert param.default == defaults[name], name


def test_bad_config_values_name_the_field(tmp_path) -> None:
    for kwargs, message in ((dict(normalize="mean"), "normalize"), (dict(backend="gpu"), "backend"),
                            (dict(graphs=["ring"]), "graph"), (dict(n=1), r"n must be in \[2, "),
                            (dict(ks=[1]), r"ks must be in \[2, "), (dict(record_every=0), "record_every")):
        with pytest.raises(ValueError, match=message):
            SynthConfig(**kwargs)
    with pytest.raises(ValueError, match="normalize"):
        train_runs([RunSpec("x")], normalize="mean", steps=1)
    with pytest.raises(TypeError, match="unknown options"):
        run_experiment("bias-vs-rel", stpes=10)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = cli_main(["synth", "xi", "--output", str(tmp_path), "--n", "1", "--no-plots"])
    assert rc == 2 and "error: n must be in [2, " in err.getvalue()
    assert not (tmp_path / "summary.json").exists()


def test_experiment_registry(tmp_path) -> None:
    from open_clip_sigrel.tools import synth

    assert list(synth.EXPERIMENTS) == ["bias-vs-rel", "fixed-rel-bias", "fixed-t", "init-grid", "frozen",
                                       "modalities", "xi"]
    assert all(e.description for e in synth.EXPERIMENTS.values())
    # an experiment's own default for a knob left at None (fixed-t: b_rel 0 and 0.5)
    cfg = synth.resolve_config("fixed-t")
    assert cfg.rel_biases == (0.0, 0.5) and synth.resolve_config("fixed-rel-bias").rel_biases[0] == -1.0
    assert synth.resolve_config("fixed-t", rel_biases=[0.2]).rel_biases == (0.2,)
    names = [s.name for b in build_batches("fixed-t") for s in b.specs]
    assert "t=10 fixed, b_rel=0.5 fixed" in names and len(names) == 3 * 3

    @synth.register_experiment("test-two-seeds", "two trained runs")
    def _two(cfg: SynthConfig) -> list:
        return [synth.Batch([RunSpec(f"s{seed}", seed=seed) for seed in (cfg.seed, cfg.seed + 1)], cfg.dim)]

    try:
        assert "test-two-seeds" in synth.EXPERIMENTS
        with pytest.raises(ValueError, match="already registered"):
            synth.register_experiment("test-two-seeds", "again")(_two)
        buf = io.StringIO()
        with redirect_stdout(buf):  # the CLI's choices are the registry's
            rc = cli_main(["synth", "test-two-seeds", "--output", str(tmp_path), "--n", "10", "--dim", "3",
                           "--steps", "5", "--no-plots", "--json"])
        assert rc == 0 and [r["name"] for r in json.loads(buf.getvalue())["runs"]] == ["s0", "s1"]
    finally:
        del synth._REGISTRY["test-two-seeds"]
    with pytest.raises(TypeError, match="unknown SynthConfig fields"):
        synth.register_experiment("x", "y", not_a_knob=1)
    with pytest.raises(ValueError, match="unknown experiment 'nope'; choose from bias-vs-rel"):
        build_batches("nope")


def test_run_leaves_threads_and_matplotlib_backend_alone(tmp_path) -> None:
    import matplotlib

    old_backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # not Agg: a run that switched the backend to Agg would show
    torch.set_num_threads(2)
    try:
        run_experiment("bias-vs-rel", output=str(tmp_path), n=10, dim=3, steps=5, b0=[0.0], threads=1)
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "histograms.png").stat().st_size > 0
        assert matplotlib.get_backend() == "pdf"
        assert torch.get_num_threads() == 2
    finally:
        matplotlib.use(old_backend)


def test_missing_matplotlib_fails_before_training(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"open_clip_sigrel\[plots\]"):
        run_experiment("xi", output=str(tmp_path), n=10, dim=3, steps=5, dims=[3])
    assert not (tmp_path / "summary.json").exists()
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = cli_main(["synth", "xi", "--output", str(tmp_path), "--n", "10", "--steps", "5", "--dims", "3"])
    assert rc == 1 and "plots" in err.getvalue() and "--no-plots" in err.getvalue()
    summary = run_experiment("xi", output=str(tmp_path), plots=False, n=10, dim=3, steps=5, dims=[3])
    assert summary["runs"] and (tmp_path / "summary.json").exists()
