"""The paper's synthetic constellation experiments (Bangachev et al., arXiv 2509.18552, Sec. 4).

The embeddings themselves are the parameters: U, V are N x d i.i.d. Gaussian rows normalised to the
sphere; Adam (lr 1e-2) moves everything (log t, the bias, U, V); every step uses all N^2 pairs and
re-projects U, V onto the sphere. Defaults: N = 100, d = 10, 10,000 steps, loss = mean over N^2
(``normalize="pairs"``). Two parameterisations of the same loss:

* relative: the trained scalar is b_rel itself (logits t * (s - b_rel));
* absolute: the trained scalar is open_clip's logit_bias (logits t * s + logit_bias), i.e. the same
  loss at b_rel = -logit_bias / t; only what Adam moves differs.

Runs of one experiment that share shapes are trained together as one tensor program: their
parameters are stacked along a leading run axis (Adam is elementwise, so this is exactly R separate
optimisers), frozen scalars / towers get zero gradients (Adam then never moves them).

Per run we report the final loss, t, b_rel, the halved margin m* = (min_i s_ii - max_{i!=j} s_ij) / 2,
b*_rel = (min_i s_ii + max_{i!=j} s_ij) / 2 and xi = mean_i |(u_i - v_i) - mean(u - v)|^2; with k > 2
modalities, min / max run over the pairs of the graph and xi is averaged over them.

CLI: ``open-clip-sigrel synth EXPERIMENT --output DIR [options] [--json]``; writes DIR/summary.json,
DIR/curves.json, DIR/curves.png and DIR/histograms.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from open_clip_sigrel.loss import batched_sigrel_loss, multimodal_sigrel_loss, sigrel_loss

EXPERIMENTS = ("bias-vs-rel", "fixed-rel-bias", "fixed-t", "init-grid", "frozen", "modalities", "xi")
BACKENDS = ("batched", "loop")
DEFAULT_B0 = (-10.0, -5.0, 0.0, 5.0, 10.0)
DEFAULT_REL_BIASES = (-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


# ----------------------------------------------------------------------------------------------
# Run specification and the training engine
# ----------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One synthetic run.

    kind: "rel" trains b_rel itself; "abs" trains open_clip's logit_bias (b_rel = -logit_bias / t).
    t0, b_rel0: initial t and b_rel (an "abs" run starts at logit_bias0 = -t0 * b_rel0: same logits).
    train_t / train_b: whether log t / the bias are trained; train_u: whether modality 0 (U) is trained.
    """

    name: str
    kind: str = "rel"
    t0: float = 10.0
    b_rel0: float = 0.0
    train_t: bool = True
    train_b: bool = True
    train_u: bool = True
    seed: int = 0
    group: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("rel", "abs"):
            raise ValueError(f"kind must be 'rel' or 'abs', got {self.kind!r}")
        if not self.t0 > 0:
            raise ValueError(f"t0 must be > 0, got {self.t0}")

    @property
    def logit_bias0(self) -> float:
        """open_clip's logit_bias at the start: -t0 * b_rel0."""
        return -self.t0 * self.b_rel0


def init_embeddings(seed: int, n: int, dim: int, k: int = 2) -> torch.Tensor:
    """(k, n, dim) float32: i.i.d. Gaussian rows normalised to the sphere, from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.randn(k, n, dim, generator=gen, dtype=torch.float32), dim=-1)


def _edges(k: int, graph: str) -> list[tuple[int, int]]:
    if k < 2:
        raise ValueError(f"need k >= 2 modalities, got {k}")
    if graph == "complete":
        return [(a, c) for a in range(k) for c in range(a + 1, k)]
    if graph == "star":
        return [(0, c) for c in range(1, k)]
    raise ValueError(f"graph must be 'complete' or 'star', got {graph!r}")


@torch.no_grad()
def _geometry(feats: torch.Tensor, edges: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Per run: min positive, max negative similarity over the graph's pairs, and xi (edge mean)."""
    ia = [a for a, _ in edges]
    ic = [c for _, c in edges]
    x, y = feats[:, ia], feats[:, ic]  # (R, E, n, d)
    s = x @ y.transpose(-1, -2)
    n = s.shape[-1]
    pos = s.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(n, dtype=torch.bool)
    neg_max = s.masked_fill(eye, -math.inf).amax((-1, -2))
    diff = x - y
    xi = (diff - diff.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1)
    return {"min_pos": pos.amin((-1, -2)), "max_neg": neg_max.amax(-1), "xi": xi.mean(-1)}


@torch.no_grad()
def _reference_losses(
    feats: torch.Tensor, t: torch.Tensor, b: torch.Tensor, k: int, graph: str, normalize: str
) -> list[float]:
    """Per-run loss values from the project's own loss functions (one call per run, in float64)."""
    out = []
    # float64: the value sum softplus(z) - sum z_ii cancels badly in float32 once the loss is < ~1e-6
    feats, t, b = feats.double(), t.double(), b.double()
    for r in range(feats.shape[0]):
        if k == 2:
            v = sigrel_loss(feats[r, 0], feats[r, 1], t[r], b[r], normalize=normalize)
        else:
            v = multimodal_sigrel_loss(list(feats[r]), t[r], b[r], graph=graph, normalize=normalize)
        out.append(float(v))
    return out


def _make_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


def train_runs(
    specs: Sequence[RunSpec],
    *,
    n: int = 100,
    dim: int = 10,
    steps: int = 10_000,
    lr: float = 1e-2,
    normalize: str = "pairs",
    record_every: int = 100,
    k: int = 2,
    graph: str = "complete",
    backend: str = "batched",
    keep_similarities: bool = True,
    keep_features: bool = False,
) -> list[dict[str, Any]]:
    """Train the runs in ``specs`` together (one stacked tensor program) and return one result each.

    Each result: {"spec": asdict(spec), "final": {...}, "curves": {...}, "pos"/"neg": final similarity
    tensors (only with keep_similarities), "features": final (k, n, dim) embeddings (keep_features)}.
    ``backend="loop"`` computes the gradient by calling the project's ``sigrel_loss`` /
    ``multimodal_sigrel_loss`` once per run (the reference, slower); "batched" uses
    ``loss.batched_sigrel_loss`` (checked equal in the tests). Reported losses always come from the
    project's functions, evaluated in float64 at the record steps.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not specs:
        return []
    if n < 2 or dim < 1 or steps < 0 or record_every < 1 or lr <= 0:
        raise ValueError(f"bad sizes: n={n} dim={dim} steps={steps} record_every={record_every} lr={lr}")
    edges = _edges(k, graph)
    r_count = len(specs)
    feats = torch.stack([init_embeddings(s.seed, n, dim, k) for s in specs]).requires_grad_(True)
    log_t = torch.tensor([math.log(s.t0) for s in specs], dtype=torch.float32, requires_grad=True)
    bias = torch.tensor(
        [s.logit_bias0 if s.kind == "abs" else s.b_rel0 for s in specs], dtype=torch.float32, requires_grad=True
    )
    is_abs = torch.tensor([s.kind == "abs" for s in specs])
    mask_t = torch.tensor([float(s.train_t) for s in specs])
    mask_b = torch.tensor([float(s.train_b) for s in specs])
    mask_u = torch.tensor([float(s.train_u) for s in specs])
    all_t, all_b, all_u = bool(mask_t.all()), bool(mask_b.all()), bool(mask_u.all())
    frozen_u = ~mask_u.bool()
    opt = _make_adam([feats, log_t, bias], lr)
    ia = torch.tensor([a for a, _ in edges])
    ic = torch.tensor([c for _, c in edges])
    n_edges = len(edges)

    def scalars() -> tuple[torch.Tensor, torch.Tensor]:
        t = log_t.exp()
        return t, torch.where(is_abs, -bias / t, bias)

    def step_loss() -> torch.Tensor:
        t, b = scalars()
        if backend == "loop":
            return sum(
                sigrel_loss(feats[r, 0], feats[r, 1], t[r], b[r], normalize=normalize)
                if k == 2
                else multimodal_sigrel_loss(list(feats[r].unbind(0)), t[r], b[r], graph=graph, normalize=normalize)
                for r in range(r_count)
            )
        if k == 2:
            losses = batched_sigrel_loss(feats[:, 0], feats[:, 1], t, b, normalize=normalize, compute_value=False)
        else:
            x = feats[:, ia].reshape(r_count * n_edges, n, dim)
            y = feats[:, ic].reshape(r_count * n_edges, n, dim)
            losses = batched_sigrel_loss(
                x, y, t.repeat_interleave(n_edges), b.repeat_interleave(n_edges),
                normalize=normalize, compute_value=False,
            ).view(r_count, n_edges).mean(1)
        return losses.sum()

    curves: dict[str, list] = {key: [] for key in ("step", "loss", "t", "b_rel", "margin", "b_star", "xi")}

    def record(step: int) -> None:
        with torch.no_grad():
            t, b = scalars()
            geo = _geometry(feats.detach(), edges)
            losses = _reference_losses(feats.detach(), t, b, k, graph, normalize)
        margin = (geo["min_pos"] - geo["max_neg"]) / 2
        b_star = (geo["min_pos"] + geo["max_neg"]) / 2
        curves["step"].append(step)
        curves["loss"].append(losses)
        for key, val in (("t", t), ("b_rel", b), ("margin", margin), ("b_star", b_star), ("xi", geo["xi"])):
            curves[key].append(val.tolist())

    record(0)
    for step in range(1, steps + 1):
        loss = step_loss()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            if not all_t:
                log_t.grad.mul_(mask_t)
            if not all_b:
                bias.grad.mul_(mask_b)
            if not all_u:
                feats.grad[:, 0].mul_(mask_u[:, None, None])
        opt.step()
        with torch.no_grad():
            if all_u:
                feats.div_(feats.norm(dim=-1, keepdim=True))
            else:
                keep = feats[frozen_u, 0].clone()
                feats.div_(feats.norm(dim=-1, keepdim=True))
                feats[frozen_u, 0] = keep  # frozen rows stay bit-identical
        if step % record_every == 0 or step == steps:
            record(step)

    results = []
    with torch.no_grad():
        fin = feats.detach()
        x, y = fin[:, ia], fin[:, ic]
        sims = x @ y.transpose(-1, -2)  # (R, E, n, n)
        eye = torch.eye(n, dtype=torch.bool)
    for r, spec in enumerate(specs):
        per_run = {key: [row[r] for row in vals] if key != "step" else list(vals) for key, vals in curves.items()}
        final = {key: per_run[key][-1] for key in per_run if key != "step"}
        t_final = final["t"]
        final["logit_bias"] = -t_final * final["b_rel"]
        final["steps"] = steps
        final["min_pos"] = final["b_star"] + final["margin"]
        final["max_neg"] = final["b_star"] - final["margin"]
        res: dict[str, Any] = {"spec": asdict(spec), "final": final, "curves": per_run}
        if keep_similarities:
            res["pos"] = sims[r].diagonal(dim1=-2, dim2=-1).reshape(-1).clone()
            res["neg"] = sims[r][:, ~eye].reshape(-1).clone()
        if keep_features:
            res["features"] = fin[r].clone()
        results.append(res)
    return results


# ----------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Runs that share shapes (trained together)."""

    specs: list[RunSpec]
    dim: int
    k: int = 2
    graph: str = "complete"


def _seeds(opts: dict[str, Any]) -> list[int]:
    return [int(opts["seed"]) + i for i in range(int(opts.get("repeats", 1)))]


def build_batches(experiment: str, opts: dict[str, Any]) -> list[Batch]:
    """The runs of an experiment (see the module docstring and ``configure_parser`` for the options)."""
    seeds = _seeds(opts)
    dim, t0 = int(opts["dim"]), float(opts["t0"])
    specs: list[RunSpec] = []
    if experiment == "bias-vs-rel":
        for seed in seeds:
            for b0 in opts["b0"]:
                for kind in ("abs", "rel"):
                    # same starting logits: logit_bias0 = -b0 (abs), b_rel0 = b0 / t0 (rel)
                    specs.append(RunSpec(f"{kind} b0={b0:g}" + (f" s{seed}" if len(seeds) > 1 else ""),
                                         kind=kind, t0=t0, b_rel0=b0 / t0, seed=seed, group=kind,
                                         info={"b0": b0}))
        return [Batch(specs, dim)]
    if experiment == "fixed-rel-bias":
        for seed in seeds:
            for b in opts["rel_biases"]:
                specs.append(RunSpec(f"b_rel={b:g} fixed" + (f" s{seed}" if len(seeds) > 1 else ""),
                                     t0=t0, b_rel0=b, train_b=False, seed=seed, group="fixed b_rel"))
        return [Batch(specs, dim)]
    if experiment == "fixed-t":
        for seed in seeds:
            sfx = f" s{seed}" if len(seeds) > 1 else ""
            t_modes = [(f"t={tv:g} fixed", tv, False) for tv in opts["t_values"]] + [(f"t0={t0:g} trained", t0, True)]
            b_modes = [(f"b_rel={b:g} fixed", b, False) for b in opts["rel_biases"]]
            b_modes.append((f"b_rel0={opts['b_rel0']:g} trained", float(opts["b_rel0"]), True))
            for t_name, tv, t_train in t_modes:
                for b_name, bv, b_train in b_modes:
                    specs.append(RunSpec(f"{t_name}, {b_name}{sfx}", t0=tv, b_rel0=bv, train_t=t_train,
                                         train_b=b_train, seed=seed, group=t_name))
        return [Batch(specs, dim)]
    if experiment == "init-grid":
        for seed in seeds:
            for tv in opts["t0s"]:
                for bv in opts["b_rel0s"]:
                    specs.append(RunSpec(f"t0={tv:g} b_rel0={bv:g}" + (f" s{seed}" if len(seeds) > 1 else ""),
                                         t0=tv, b_rel0=bv, seed=seed, group=f"t0={tv:g}"))
        return [Batch(specs, dim)]
    if experiment == "frozen":
        for seed in seeds:
            sfx = f" s{seed}" if len(seeds) > 1 else ""
            for b0 in opts["b0"]:
                specs.append(RunSpec(f"rel b0={b0:g}{sfx}", kind="rel", t0=t0, b_rel0=b0 / t0, train_u=False,
                                     seed=seed, group="relative", info={"b0": b0}))
                specs.append(RunSpec(f"abs b0={b0:g}{sfx}", kind="abs", t0=t0, b_rel0=b0 / t0, train_u=False,
                                     seed=seed, group="absolute", info={"b0": b0}))
                tf = float(opts["fixed_t"])
                specs.append(RunSpec(f"t={tf:g} fixed b0={b0:g}{sfx}", kind="rel", t0=tf, b_rel0=b0 / t0,
                                     train_t=False, train_u=False, seed=seed, group="fixed t", info={"b0": b0}))
        return [Batch(specs, dim)]
    if experiment == "modalities":
        batches = []
        for kk in opts["ks"]:
            for graph in opts["graphs"]:
                if kk == 2 and graph != opts["graphs"][0]:
                    continue  # k = 2: both graphs are the single edge
                bspecs = [RunSpec(f"k={kk} {graph}" + (f" s{seed}" if len(seeds) > 1 else ""), t0=t0,
                                  b_rel0=float(opts["b_rel0"]), seed=seed, group=graph, info={"k": kk, "graph": graph})
                          for seed in seeds]
                batches.append(Batch(bspecs, dim, k=int(kk), graph=graph))
        return batches
    if experiment == "xi":
        return [Batch([RunSpec(f"d={d}" + (f" s{seed}" if len(seeds) > 1 else ""), t0=t0, b_rel0=float(opts["b_rel0"]),
                               seed=seed, group=f"d={d}", info={"dim": int(d)}) for seed in seeds], int(d))
                for d in opts["dims"]]
    raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")


DEFAULTS: dict[str, Any] = {
    "n": 100, "dim": 10, "steps": 10_000, "lr": 1e-2, "seed": 0, "repeats": 1, "normalize": "pairs",
    "record_every": 100, "t0": 10.0, "b0": list(DEFAULT_B0), "rel_biases": None, "t_values": [10.0, 100.0],
    "b_rel0": 0.0, "t0s": [1.0, 10.0, 100.0], "b_rel0s": [-0.5, 0.0, 0.5, 1.0], "fixed_t": 10.0,
    "ks": [2, 3, 5, 10, 20], "graphs": ["complete", "star"], "dims": [5, 10, 20, 50], "backend": "batched",
    "threads": 1,
}


def run_experiment(experiment: str, output: str | None = None, plots: bool = True, **options: Any) -> dict[str, Any]:
    """Run one experiment; returns the summary dict (also written to ``output``/summary.json).

    Options (defaults in ``DEFAULTS``): n, dim, steps, lr, seed, repeats, normalize, record_every, t0,
    b0 (bias-vs-rel, frozen), rel_biases (fixed-rel-bias; fixed-t: default [0.0, 0.5]), t_values,
    b_rel0, t0s, b_rel0s, fixed_t, ks, graphs, dims, backend, threads (torch threads during the run).
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    opts = {**DEFAULTS, **{key: v for key, v in options.items() if v is not None}}
    if opts["rel_biases"] is None:
        opts["rel_biases"] = [0.0, 0.5] if experiment == "fixed-t" else list(DEFAULT_REL_BIASES)
    if opts["normalize"] not in ("batch", "pairs", "sum"):
        raise ValueError(f"normalize must be 'batch', 'pairs' or 'sum', got {opts['normalize']!r}")
    batches = build_batches(experiment, opts)
    old_threads = torch.get_num_threads()
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    results: list[dict[str, Any]] = []
    batch_info = []
    start = time.perf_counter()
    try:
        for batch in batches:
            t_b = time.perf_counter()
            res = train_runs(
                batch.specs, n=int(opts["n"]), dim=batch.dim, steps=int(opts["steps"]), lr=float(opts["lr"]),
                normalize=opts["normalize"], record_every=int(opts["record_every"]), k=batch.k,
                graph=batch.graph, backend=opts["backend"],
            )
            wall = time.perf_counter() - t_b
            for item in res:
                item.update(dim=batch.dim, k=batch.k, graph=batch.graph)
            results.extend(res)
            batch_info.append({"dim": batch.dim, "k": batch.k, "graph": batch.graph, "runs": len(batch.specs),
                               "wall_time_s": round(wall, 3)})
    finally:
        torch.set_num_threads(old_threads)
    wall_total = time.perf_counter() - start
    summary = {
        "experiment": experiment,
        "config": {**opts, "torch": torch.__version__, "protocol": (
            "U, V (and further modalities) are the parameters: Gaussian rows normalised to the sphere; Adam on "
            "log t, the bias and the embeddings; all N^2 pairs per step; re-projection after every step")},
        "seeds": sorted({item["spec"]["seed"] for item in results}),
        "wall_time_s": round(wall_total, 3),
        "batches": batch_info,
        "runs": [_run_summary(item) for item in results],
    }
    if output:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        with open(os.path.join(output, "curves.json"), "w") as fh:
            json.dump({"experiment": experiment, "runs": [
                {"name": item["spec"]["name"], **item["curves"]} for item in results]}, fh)
        if plots:
            plot_curves(results, os.path.join(output, "curves.png"), title=experiment)
            plot_histograms(results, os.path.join(output, "histograms.png"), title=experiment)
    return summary


def _run_summary(item: dict[str, Any]) -> dict[str, Any]:
    spec = item["spec"]
    return {
        "name": spec["name"], "group": spec["group"], "kind": spec["kind"], "seed": spec["seed"],
        "t0": spec["t0"], "b_rel0": spec["b_rel0"], "logit_bias0": -spec["t0"] * spec["b_rel0"],
        "train_t": spec["train_t"], "train_b": spec["train_b"], "train_u": spec["train_u"],
        "dim": item["dim"], "k": item["k"], "graph": item["graph"], "info": spec["info"],
        "final": item["final"],
    }


# ----------------------------------------------------------------------------------------------
# Output: table and plots
# ----------------------------------------------------------------------------------------------
def format_table(summary: dict[str, Any]) -> str:
    """Console table of the final values of every run."""
    head = ("run", "seed", "loss", "t", "b_rel", "m*", "b*_rel", "xi")
    rows = []
    for run in summary["runs"]:
        f = run["final"]
        rows.append((run["name"], str(run["seed"]), f"{f['loss']:.3e}", f"{f['t']:.4g}", f"{f['b_rel']:+.4f}",
                     f"{f['margin']:+.4f}", f"{f['b_star']:+.4f}", f"{f['xi']:.2e}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    out = [f"{summary['experiment']}: {len(rows)} runs, {summary['wall_time_s']:.1f} s", line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """DIR/curves.png: loss (log), t (log), b_rel, halved margin m* and xi over steps, every run."""
    plt = _pyplot()
    keys = (("loss", "loss (log)", True), ("t", "t (log)", True), ("b_rel", "b_rel = -logit_bias / t", False),
            ("margin", "halved margin m*", False), ("xi", "xi", False))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2))
    # runs that share a start (same b0 / k) share a colour; absolute-bias runs are dashed
    colour_keys: list[Any] = []
    for item in results:
        key = item["spec"]["info"].get("b0", item["spec"]["info"].get("k", item["spec"]["name"]))
        if key not in colour_keys:
            colour_keys.append(key)
    cmap = plt.get_cmap("tab20" if len(colour_keys) > 10 else "tab10")
    for item in results:
        cur = item["curves"]
        style = "--" if item["spec"]["kind"] == "abs" else ":" if not item["spec"]["train_t"] else "-"
        colour = cmap(colour_keys.index(item["spec"]["info"].get("b0", item["spec"]["info"].get(
            "k", item["spec"]["name"]))) % cmap.N)
        for ax, (key, _, logy) in zip(axes, keys):
            ys = [max(v, 1e-30) for v in cur[key]] if logy else cur[key]
            ax.plot(cur["step"], ys, style, color=colour, lw=1.2, label=item["spec"]["name"])
    for ax, (_, label, logy) in zip(axes, keys):
        ax.set_title(label)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[3].axhline(0.0, color="k", lw=0.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(f"{title}: solid = b_rel trained as such, dashed = absolute logit_bias trained, dotted = t fixed")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * math.ceil(len(labels) / 6), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """DIR/histograms.png: final positive vs negative similarities per run, with b_rel and b_rel +- m*."""
    plt = _pyplot()
    count = len(results)
    cols = min(5, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, item in zip(axes.flat, results):
        pos = item["pos"].numpy()
        neg = item["neg"].numpy()
        if neg.size > 200_000:
            neg = neg[torch.randperm(neg.size, generator=torch.Generator().manual_seed(0))[:200_000].numpy()]
        bins = torch.linspace(-1, 1, 81).numpy()
        ax.hist(neg, bins=bins, density=True, alpha=0.6, color="tab:red", label="negatives s_ij")
        ax.hist(pos, bins=bins, density=True, alpha=0.6, color="tab:blue", label="positives s_ii")
        f = item["final"]
        ax.axvline(f["b_rel"], color="k", lw=1, label="trained b_rel")
        ax.axvline(f["min_pos"], color="tab:blue", lw=0.8, ls=":")
        ax.axvline(f["max_neg"], color="tab:red", lw=0.8, ls=":")
        ax.set_title(f"{item['spec']['name']}\nm*={f['margin']:+.3f} b_rel={f['b_rel']:+.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{title}: final similarities (dotted: min positive / max negative)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel synth`."""
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which experiment")
    parser.add_argument("--output", required=True, help="directory for summary.json, curves.json and the PNGs")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG files")
    g = parser.add_argument_group("protocol")
    g.add_argument("--n", type=int, default=DEFAULTS["n"], help="pairs N")
    g.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="embedding dimension d")
    g.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="Adam steps (full batch)")
    g.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (all parameters)")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the initial embeddings")
    g.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="seeds seed .. seed + repeats - 1")
    g.add_argument("--normalize", choices=("pairs", "batch", "sum"), default=DEFAULTS["normalize"],
                   help="loss normalisation: mean over N^2 (the paper's code), / N (open_clip) or sum")
    g.add_argument("--record-every", type=int, default=DEFAULTS["record_every"], help="curve resolution (steps)")
    g.add_argument("--t0", type=float, default=DEFAULTS["t0"], help="initial t (trained runs)")
    g.add_argument("--backend", choices=BACKENDS, default=DEFAULTS["backend"],
                   help="batched: all runs in one tensor program; loop: sigrel_loss per run (reference)")
    g.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads (small tensors: 1 is fastest)")
    e = parser.add_argument_group("experiment knobs")
    e.add_argument("--b0", type=float, nargs="+", default=DEFAULTS["b0"],
                   help="bias-vs-rel / frozen: starts b0 (abs: logit_bias0 = -b0; rel: b_rel0 = b0 / t0)")
    e.add_argument("--rel-biases", type=float, nargs="+", default=None,
                   help="fixed b_rel values (fixed-rel-bias: -1 .. 1; fixed-t: 0 0.5)")
    e.add_argument("--t-values", type=float, nargs="+", default=DEFAULTS["t_values"], help="fixed-t: frozen t values")
    e.add_argument("--b-rel0", type=float, default=DEFAULTS["b_rel0"],
                   help="initial b_rel of trained-bias runs (fixed-t, modalities, xi)")
    e.add_argument("--t0s", type=float, nargs="+", default=DEFAULTS["t0s"], help="init-grid: initial t values")
    e.add_argument("--b-rel0s", type=float, nargs="+", default=DEFAULTS["b_rel0s"], help="init-grid: initial b_rel")
    e.add_argument("--fixed-t", type=float, default=DEFAULTS["fixed_t"], help="frozen: the fixed-t runs' t")
    e.add_argument("--ks", type=int, nargs="+", default=DEFAULTS["ks"], help="modalities: numbers of modalities")
    e.add_argument("--graphs", choices=("complete", "star"), nargs="+", default=DEFAULTS["graphs"],
                   help="modalities: pair graphs")
    e.add_argument("--dims", type=int, nargs="+", default=DEFAULTS["dims"], help="xi: dimensions")


def run(args: argparse.Namespace) -> int:
    """Entry of `open-clip-sigrel synth`."""
    keys = [key for key in DEFAULTS if hasattr(args, key)]
    try:
        summary = run_experiment(args.experiment, output=args.output, plots=not args.no_plots,
                                 **{key: getattr(args, key) for key in keys})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))
        print(f"wrote {os.path.join(args.output, 'summary.json')}, curves.json, curves.png, histograms.png"
              if not args.no_plots else f"wrote {os.path.join(args.output, 'summary.json')}, curves.json")
    return 0
