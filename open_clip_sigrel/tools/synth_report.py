"""`synth report`: every synthetic experiment of the paper, over K seeds, in three protocol combinations,
with one verdict per paper claim computed from the numbers.

The combinations (``COMBOS``) separate the two ways the authors' code differs from the exact loss:

* ``authors``:      their clipped terms -log(sigmoid(z) + 1e-8) and in-loss normalisation (their code);
* ``exact+norm``:   the exact loss, in-loss normalisation (synth's default);
* ``exact``:        the exact loss fed the unit vectors as they are (no in-loss normalisation).

A claim (``CLAIMS``) is a statistic of one experiment's runs and a threshold (the paper's reported
figure, or the sign of an effect, each written next to the claim). ``verdict`` maps which
combinations satisfy it to one of ``VERDICTS``. The report's sweeps (``REPORT_OPTIONS``) are the
experiments' own, narrowed where a claim needs fewer runs (modalities: k = 2 and 20, the ends of Table 1).
"""
from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from open_clip_sigrel.io import format_table
from open_clip_sigrel.tools.synth import (
    EXPERIMENTS,
    SynthConfig,
    _json_writer,
    check_output_dir,
    run_experiment,
    write_files,
)

#: seeds per run by default: the whole report in < 30 min on 2 CPU cores at the paper's protocol
DEFAULT_SEEDS = 2
MAX_SEEDS = 1000

COMBOS: Mapping[str, dict[str, Any]] = {
    "authors": {"loss_form": "authors", "in_loss_normalize": True},
    "exact+norm": {"loss_form": "exact", "in_loss_normalize": True},
    "exact": {"loss_form": "exact", "in_loss_normalize": False},
}

VERDICTS = ("holds for the exact loss", "holds only with the clipped loss", "holds only with in-loss normalisation",
            "does not hold")

#: per experiment, the knobs the report sets (the rest: SynthConfig / the experiment's defaults)
REPORT_OPTIONS: Mapping[str, dict[str, Any]] = {
    "bias-vs-rel": {},
    "fixed-rel-bias": {"rel_biases": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)},
    "fixed-t": {"t_values": (100.0,), "rel_biases": (0.5,)},
    "init-grid": {},
    "frozen": {},
    "modalities": {"ks": (2, 20), "graphs": ("complete",), "variants": ("relative",)},
    "xi": {},
}


def verdict(holds: Mapping[str, bool]) -> str:
    """One of VERDICTS from whether the claim holds in each combination (keys of COMBOS).

    exact (with and without normalisation): for the exact loss; exact only with normalisation: only with
    in-loss normalisation; the authors' combination only: only with the clipped loss; otherwise (incl. only
    the un-normalised exact run): does not hold under the authors' protocol."""
    if holds["exact+norm"] and holds["exact"]:
        return VERDICTS[0]
    if holds["exact+norm"]:
        return VERDICTS[2]
    if holds["authors"]:
        return VERDICTS[1]
    return VERDICTS[3]


# ----------------------------------------------------------------------------------------------
# Claims: a statistic of one experiment's runs (one summary) and the test it must pass
# ----------------------------------------------------------------------------------------------
def _final(runs: Sequence[dict], key: str) -> list[float]:
    return [r["final"][key] for r in runs]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _paired(runs: Sequence[dict], a: Callable[[dict], bool], b: Callable[[dict], bool], key: Callable[[dict], Any]):
    """Pairs (run a, run b) of the same seed and start ``key``."""
    left = {(r["seed"], key(r)): r for r in runs if a(r)}
    return [(left[(r["seed"], key(r))], r) for r in runs if b(r) and (r["seed"], key(r)) in left]


def _rel_beats_abs(runs):
    pairs = _paired(runs, lambda r: r["kind"] == "rel", lambda r: r["kind"] == "abs", lambda r: r["info"]["b0"])
    return _mean([float(a["final"]["margin"] > b["final"]["margin"]) for a, b in pairs])


def _rel_margin(runs):
    return _mean(_final([r for r in runs if r["kind"] == "rel"], "margin"))


def _margin_at(b_rel: float):
    return lambda runs: _mean(_final([r for r in runs if r["b_rel0"] == b_rel], "margin"))


def _argmax_b(runs):
    by_b: dict[float, list[float]] = {}
    for r in runs:
        by_b.setdefault(r["b_rel0"], []).append(r["final"]["margin"])
    return max(by_b, key=lambda b: _mean(by_b[b]))


def _fixed_t_margin(runs):
    return _mean(_final([r for r in runs if not r["train_t"] and r["t0"] >= 100], "margin"))


def _large_t0_failures(runs):
    return _mean([float(r["final"]["margin"] <= 0) for r in runs if r["t0"] >= 100])


def _frozen_rel_best(runs):
    by = {(r["seed"], r["info"]["b0"], r["info"]["variant"]): r["final"]["loss"] for r in runs}
    wins = [float(loss < min(by.get((s, b0, "absolute"), math.inf), by.get((s, b0, "fixed t"), math.inf)))
            for (s, b0, v), loss in by.items() if v == "relative"]
    return _mean(wins)


def _gap_rise(runs):
    rel = [r for r in runs if r["info"].get("variant", "relative") == "relative"]
    ks = sorted({r["k"] for r in rel})
    return _mean(_final([r for r in rel if r["k"] == ks[-1]], "gap")) - _mean(
        _final([r for r in rel if r["k"] == ks[0]], "gap"))


def _log10_xi(runs):
    by_d: dict[int, list[float]] = {}
    for r in runs:
        by_d.setdefault(r["dim"], []).append(math.log10(max(r["final"]["xi"], 1e-300)))
    return max(_mean(v) for v in by_d.values())


@dataclass(frozen=True)
class Claim:
    experiment: str
    text: str  # the paper's claim
    statistic: str  # what is measured
    value: Callable[[Sequence[dict]], float]
    test: Callable[[float], bool]
    threshold: str  # the test, in words (where its number comes from)


CLAIMS: tuple[Claim, ...] = (
    Claim("bias-vs-rel", "relative b_rel ends with a larger margin than absolute logit_bias from the same start",
          "fraction of (seed, b0) starts with m*(rel) > m*(abs)", _rel_beats_abs, lambda v: v >= 0.75,
          ">= 0.75 (paper: 4 of 5 starts)"),
    Claim("bias-vs-rel", "relative-bias margins are 0.23-0.30", "mean m* of the relative runs", _rel_margin,
          lambda v: v >= 0.22, ">= 0.22 (paper's range 0.23-0.30, less 0.01)"),
    Claim("fixed-rel-bias", "b_rel fixed at 1 still gives a large margin (Table 2: m* = 0.276)",
          "mean m* at b_rel = 1", _margin_at(1.0), lambda v: v >= 0.2, ">= 0.2"),
    Claim("fixed-rel-bias", "the margin is largest at a large b_rel (paper: ~0.78)", "b_rel of the largest mean m*",
          _argmax_b, lambda v: v >= 0.7, ">= 0.7"),
    Claim("fixed-t", "a fixed high t (100) fails to separate", "mean m* of the t = 100 fixed runs", _fixed_t_margin,
          lambda v: v < 0, "< 0 (no constellation)"),
    Claim("init-grid", "a large initial t (100) fails (Table 3)", "fraction of t0 = 100 runs with m* <= 0",
          _large_t0_failures, lambda v: v >= 0.5, ">= 0.5"),
    Claim("frozen", "with one tower frozen, relative b_rel reaches a lower loss than absolute logit_bias and fixed t",
          "fraction of (seed, b0) starts where the relative run's loss is the lowest", _frozen_rel_best,
          lambda v: v >= 0.75, ">= 0.75"),
    Claim("modalities", "the un-halved gap rises with the number of modalities (Table 1: 0.471 at k = 2, 0.611 at "
          "k = 20)", "mean gap at the largest k minus at the smallest k (relative runs)", _gap_rise,
          lambda v: v > 0, "> 0"),
    Claim("xi", "xi ends near 0 (log10 xi between -4.4 and -3)", "largest mean log10 xi over the dimensions",
          _log10_xi, lambda v: v <= -2.5, "<= -2.5 (half an order above the paper's -3)"),
)


def evaluate_claims(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> list[dict[str, Any]]:
    """runs[experiment][combo]: that summary's runs. One entry per claim whose experiment is present."""
    out = []
    for claim in CLAIMS:
        if claim.experiment not in runs:
            continue
        values = {combo: float(claim.value(runs[claim.experiment][combo])) for combo in COMBOS}
        holds = {combo: bool(claim.test(v)) for combo, v in values.items()}
        out.append({"experiment": claim.experiment, "claim": claim.text, "statistic": claim.statistic,
                    "threshold": claim.threshold, "values": values, "holds": holds, "verdict": verdict(holds)})
    return out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _label(name: str) -> str:
    return re.sub(r" s\d+$", "", name)  # the run without its seed suffix


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.3f} ± {sd:.3f}"


def experiment_table(summaries: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: each run (seeds pooled); columns: mean ± sd (over seeds) of m*, gap and the loss per combination."""
    labels: list[str] = []
    cells: dict[tuple[str, str], list[dict]] = {}
    for combo, summary in summaries.items():
        for r in summary["runs"]:
            lab = _label(r["name"])
            if lab not in labels:
                labels.append(lab)
            cells.setdefault((lab, combo), []).append(r["final"])
    head = ["run"] + [f"{c}: {col}" for c in summaries for col in ("m* (halved)", "gap (2m*)", "loss")]
    rows = []
    for lab in labels:
        row = [lab]
        for combo in summaries:
            fin = cells.get((lab, combo), [])
            row += [_spread([f["margin"] for f in fin]), _spread([f["gap"] for f in fin]),
                    f"{_mean([f['loss'] for f in fin]):.2e}"]
        rows.append(row)
    return head, rows


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict_line(c: dict[str, Any]) -> str:
    vals = ", ".join(f"{k} {v:+.3g}" for k, v in c["values"].items())
    return f"{c['experiment']}: \"{c['claim']}\": {c['verdict']} ({c['statistic']} {c['threshold']}: {vals})"


def render_markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    parts = [
        "# The paper's synthetic experiments, re-run (arXiv 2509.18552)", "",
        f"Command: `{doc['command']}`  ", f"Seeds: {doc['seeds']}; N = {cfg['n']}, d = {cfg['dim']}, "
        f"{cfg['steps']} Adam steps at lr {cfg['lr']:g}, loss normalisation {cfg['normalize']}.  ",
        "Combinations: " + "; ".join(f"`{c}` = {o['loss_form']} loss, in-loss normalisation "
                                     f"{'on' if o['in_loss_normalize'] else 'off'}" for c, o in COMBOS.items()) + ".",
        "", "m* = (min pos - max neg) / 2 is the halved margin; gap = min pos - max neg = 2 m* (the paper's tables).",
        "", "## Verdicts", "",
    ]
    parts += [f"- {verdict_line(c)}" for c in doc["claims"]]
    parts += ["", "## Per experiment (mean ± sd over seeds)", ""]
    for name, exp in doc["experiments"].items():
        parts += [f"### {name} ({exp['wall_time_s']:.0f} s)", "", _md_table(*experiment_table(exp["runs"])), ""]
    parts += ["![report](report.png)", ""] if doc.get("plot") else []
    return "\n".join(parts)


def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's figure: Table 2's m* against the fixed b_rel, and bias-vs-rel's m* against b0."""
    panels = []
    exps = doc["experiments"]
    if "fixed-rel-bias" in exps:
        series = {}
        for combo, summary in exps["fixed-rel-bias"]["runs"].items():
            bs = sorted({r["b_rel0"] for r in summary["runs"]})
            series[combo] = (bs, [_margin_at(b)(summary["runs"]) for b in bs])
        panels.append({"title": "fixed-rel-bias (Table 2)", "xlabel": "fixed b_rel", "ylabel": "mean m*",
                       "series": series})
    if "bias-vs-rel" in exps:
        series = {}
        for combo, summary in exps["bias-vs-rel"]["runs"].items():
            for kind in ("rel", "abs"):
                runs = [r for r in summary["runs"] if r["kind"] == kind]
                b0s = sorted({r["info"]["b0"] for r in runs})
                series[f"{combo} {kind}"] = (b0s, [_mean([r["final"]["margin"] for r in runs if r["info"]["b0"] == b])
                                                   for b in b0s])
        panels.append({"title": "bias-vs-rel", "xlabel": "b0 (start logits t s - b0)", "ylabel": "mean m*",
                       "series": series})
    return panels


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w") as fh:
            fh.write(text)
    return write


def run_report(output: str, *, seeds: int = DEFAULT_SEEDS, plots: bool = True, config: SynthConfig | None = None,
               experiments: Sequence[str] | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the report; writes output/report.md, report.json (and report.png with ``plots``); returns the document.

    Everything is checked before the first run: ``seeds`` (1..MAX_SEEDS), the config, the output directory,
    matplotlib. ``experiments``: a subset (default: all registered ones that have a report entry)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be an integer in [1, {MAX_SEEDS}], got {seeds!r}")
    base = replace(config or SynthConfig(), repeats=seeds)
    names = list(experiments) if experiments is not None else [n for n in EXPERIMENTS if n in REPORT_OPTIONS]
    for name in names:
        if name not in REPORT_OPTIONS:
            raise ValueError(f"the report has no entry for experiment {name!r}; choose from {', '.join(REPORT_OPTIONS)}")
        for opts in COMBOS.values():  # every configuration valid before any run
            replace(base, **opts, **REPORT_OPTIONS[name])
    output = check_output_dir(output)
    if plots:
        from open_clip_sigrel.extras import require

        require("matplotlib", "plots")
    start = time.perf_counter()
    experiments_doc: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        runs = {combo: run_experiment(name, plots=False, config=replace(base, **opts), **REPORT_OPTIONS[name])
                for combo, opts in COMBOS.items()}
        experiments_doc[name] = {"wall_time_s": round(time.perf_counter() - t0, 2),
                                 "options": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in REPORT_OPTIONS[name].items()}, "runs": runs}
    claims = evaluate_claims({n: {c: s["runs"] for c, s in e["runs"].items()} for n, e in experiments_doc.items()})
    cfg = base
    doc: dict[str, Any] = {
        "command": command or f"open-clip-sigrel synth report --output {output} --seeds {seeds}",
        "seeds": cfg.seeds, "combos": {c: dict(o) for c, o in COMBOS.items()},
        "config": {"n": cfg.n, "dim": cfg.dim, "steps": cfg.steps, "lr": cfg.lr, "normalize": cfg.normalize},
        "experiments": experiments_doc, "claims": claims, "verdict_lines": [verdict_line(c) for c in claims],
        "wall_time_s": round(time.perf_counter() - start, 2), "plot": bool(plots),
    }
    writers: dict[str, Callable[[str], None]] = {}
    panels = _panels(doc)
    if plots and panels:
        from open_clip_sigrel.tools.plots import plot_panels

        writers["report.png"] = lambda path: plot_panels(panels, path, title="synth report")
    else:
        doc["plot"] = False
    writers["report.md"] = _text_writer(render_markdown(doc))
    writers["report.json"] = _json_writer(doc)
    write_files(output, writers)
    return doc


def claims_table(claims: Sequence[dict[str, Any]]) -> str:
    """Console table of the claims: value per combination and verdict."""
    head = ["experiment", "claim"] + list(COMBOS) + ["verdict"]
    rows = [[c["experiment"], c["claim"][:60]] + [f"{c['values'][k]:+.3g}{'*' if c['holds'][k] else ''}"
                                                  for k in COMBOS] + [c["verdict"]] for c in claims]
    return format_table(head, rows, title="claims (*: holds)")
