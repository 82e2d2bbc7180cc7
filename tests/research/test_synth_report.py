"""`synth report`: verdict logic on constructed inputs, and a tiny real report (markdown + JSON, every
experiment and combination)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from itertools import product

import pytest

from open_clip_sigrel.cli import main as cli_main
from open_clip_sigrel.tools import synth_report as rep
from open_clip_sigrel.tools.synth import EXPERIMENTS, SynthConfig


@pytest.mark.parametrize("authors, norm, exact", list(product([False, True], repeat=3)))
def test_verdict_table(authors: bool, norm: bool, exact: bool) -> None:
    got = rep.verdict({"authors": authors, "exact+norm": norm, "exact": exact})
    if norm and exact:
        want = "holds for the exact loss"
    elif norm:
        want = "holds only with in-loss normalisation"
    elif authors:
        want = "holds only with the clipped loss"
    else:
        want = "does not hold"
    assert got == want and got in rep.VERDICTS


def _run(name, seed, margin, *, kind="rel", loss=1.0, **extra):
    run = {"name": name, "seed": seed, "kind": kind, "final": {"margin": margin, "gap": 2 * margin, "loss": loss,
                                                              "xi": extra.pop("xi", 1e-4)},
           "info": extra.pop("info", {}), "t0": extra.pop("t0", 10.0), "train_t": extra.pop("train_t", True),
           "b_rel0": extra.pop("b_rel0", 0.0), "k": extra.pop("k", 2), "dim": extra.pop("dim", 10)}
    assert not extra
    return run


def _claims(experiment: str, per_combo: dict) -> dict:
    out = {c["claim"]: c for c in rep.evaluate_claims({experiment: per_combo})}
    assert out and all(c["experiment"] == experiment for c in out.values())
    return out


def test_claims_are_computed_from_the_numbers() -> None:
    # fixed t = 100: separates with the exact loss (m* > 0), not with the clipped one
    def fixed_t(m):
        return [_run("t=100 fixed", s, m, t0=100.0, train_t=False) for s in (0, 1)] + [
            _run("t0=10 trained", s, 0.3) for s in (0, 1)]
    (c,) = _claims("fixed-t", {"authors": fixed_t(-0.4), "exact+norm": fixed_t(0.05), "exact": fixed_t(0.08)}).values()
    assert c["values"] == pytest.approx({"authors": -0.4, "exact+norm": 0.05, "exact": 0.08})
    assert c["holds"] == {"authors": True, "exact+norm": False, "exact": False}
    assert c["verdict"] == "holds only with the clipped loss"

    # Table 2: the margin at b_rel = 1 and where the largest margin is
    def table2(m_at_1, best):
        return [_run(f"b={b}", 0, (m_at_1 if b == 1.0 else 0.35 if b == best else 0.1), b_rel0=b)
                for b in (0.0, 0.6, 0.8, 1.0)]
    claims = _claims("fixed-rel-bias", {"authors": table2(0.28, 0.8), "exact+norm": table2(0.27, 0.8),
                                        "exact": table2(0.1, 0.6)})
    large, argmax = claims.values()
    assert large["verdict"] == "holds only with in-loss normalisation" and large["values"]["exact"] == 0.1
    assert argmax["values"] == {"authors": 0.8, "exact+norm": 0.8, "exact": 0.6}
    assert argmax["verdict"] == "holds only with in-loss normalisation"

    # bias-vs-rel: rel beats abs in 4 of 5 starts everywhere; margins large only with normalisation
    def bvr(rel_m):
        runs = []
        for i, b0 in enumerate((-10, -5, 0, 5, 10)):
            runs.append(_run(f"rel b0={b0}", 0, rel_m, info={"b0": b0}))
            runs.append(_run(f"abs b0={b0}", 0, 0.15 if i else 0.5, kind="abs", info={"b0": b0}))  # abs wins once
        return runs
    beats, size = _claims("bias-vs-rel", {"authors": bvr(0.27), "exact+norm": bvr(0.26), "exact": bvr(0.2)}).values()
    assert beats["values"]["exact"] == pytest.approx(0.8) and beats["verdict"] == "holds for the exact loss"
    assert size["values"]["exact"] == pytest.approx(0.2) and size["verdict"] == "holds only with in-loss normalisation"

    # modalities: the gap rises with k only in the authors' combination; xi: never near 0
    def mods(g2, g20):
        return [_run("k=2", 0, g2 / 2, k=2), _run("k=20", 0, g20 / 2, k=20)]
    (m,) = _claims("modalities", {"authors": mods(0.47, 0.61), "exact+norm": mods(0.41, 0.27),
                                  "exact": mods(0.4, 0.3)}).values()
    assert m["values"]["authors"] == pytest.approx(0.14) and m["verdict"] == "holds only with the clipped loss"
    xi_runs = [_run(f"d={d}", 0, 0.1, dim=d, xi=10.0 ** -1.8) for d in (5, 10)]
    (x,) = _claims("xi", {c: xi_runs for c in rep.COMBOS}).values()
    assert x["values"]["exact"] == pytest.approx(-1.8) and x["verdict"] == "does not hold"

    # init-grid: failures at t0 = 100; frozen: the relative run's loss is the lowest
    grid = [_run("t0=100", s, -0.2 if s else 0.1, t0=100.0) for s in range(4)] + [_run("t0=1", 0, -0.5, t0=1.0)]
    (g,) = _claims("init-grid", {c: grid for c in rep.COMBOS}).values()
    assert g["values"]["exact"] == pytest.approx(0.75) and g["verdict"] == "holds for the exact loss"
    frozen = [_run(v, 0, 0.1, loss=loss, info={"b0": 0.0, "variant": v})
              for v, loss in (("relative", 0.1), ("absolute", 0.2), ("fixed t", 0.05))]
    (f,) = _claims("frozen", {c: frozen for c in rep.COMBOS}).values()
    assert f["values"]["exact"] == 0.0 and f["verdict"] == "does not hold"


def test_report_writes_markdown_and_json_with_every_experiment_and_combo(tmp_path) -> None:
    out = tmp_path / "report"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["synth", "report", "--output", str(out), "--seeds", "2", "--n", "10", "--dim", "3",
                       "--steps", "6", "--record-every", "3", "--json"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert doc == json.loads((out / "report.json").read_text())
    assert doc["seeds"] == [0, 1] and set(doc["combos"]) == set(rep.COMBOS)
    assert list(doc["experiments"]) == [n for n in EXPERIMENTS if n in rep.REPORT_OPTIONS] == list(rep.REPORT_OPTIONS)
    for exp in doc["experiments"].values():
        assert set(exp["runs"]) == set(rep.COMBOS) and exp["wall_time_s"] >= 0
        for combo, summary in exp["runs"].items():
            cfg = summary["config"]
            assert (cfg["loss_form"], cfg["in_loss_normalize"]) == tuple(rep.COMBOS[combo].values())
            assert {r["seed"] for r in summary["runs"]} == {0, 1} and cfg["steps"] == 6
    assert {c["experiment"] for c in doc["claims"]} == set(rep.REPORT_OPTIONS)
    assert len(doc["claims"]) == len(rep.CLAIMS) == len(doc["verdict_lines"])
    md = (out / "report.md").read_text()
    for line in doc["verdict_lines"]:
        assert line in md
    for name in rep.REPORT_OPTIONS:
        assert f"### {name}" in md
    assert "authors: m* (halved)" in md and "exact: gap (2m*)" in md and "![report](report.png)" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    # a verdict is recomputed from the stored runs: the same as the one written
    runs = {n: {c: s["runs"] for c, s in e["runs"].items()} for n, e in doc["experiments"].items()}
    assert rep.evaluate_claims(runs) == doc["claims"]


def test_report_rejects_bad_values_before_any_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rep, "run_experiment", lambda *a, **k: pytest.fail("a run started"))
    for kwargs, message in ((dict(seeds=0), "seeds"), (dict(seeds=True), "seeds"),
                            (dict(experiments=["nope"]), "no entry"),):
        with pytest.raises(ValueError, match=message):
            rep.run_report(str(tmp_path / "r"), **kwargs)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        rep.run_report(str(blocker / "r"), config=SynthConfig(steps=1), seeds=1)
    assert not (tmp_path / "r").exists()
