"""The paper's synthetic constellation experiments (Bangachev et al., arXiv 2509.18552, Sec. 4).

The embeddings themselves are the parameters: U, V are N x d i.i.d. Gaussian rows normalised to the
sphere; Adam moves everything (log t, the bias, U, V); every step uses all N^2 pairs and re-projects
U, V onto the sphere. The paper's protocol (its N, d, steps, learning rate and loss normalisation) is
the defaults of ``SynthConfig``. Two parameterisations of the same loss:

* relative: the trained scalar is b_rel itself (logits t * (s - b_rel));
* absolute: the trained scalar is open_clip's logit_bias (logits t * s + logit_bias), i.e. the same
  loss at b_rel = rel_bias_from_logit_bias(logit_bias, t); only what Adam moves differs.

Runs of one experiment that share shapes are trained together as one tensor program: their
parameters are stacked along a leading run axis (Adam is elementwise, so this is exactly R separate
optimisers), frozen scalars / towers get zero gradients (Adam then never moves them).

Per run we report the final loss, t, b_rel, the halved margin m* and b*_rel of the constellation
(``metrics.functional.margin_and_rel_bias`` of min_i s_ii and max_{i!=j} s_ij) and
xi = mean_i |(u_i - v_i) - mean(u - v)|^2; with k > 2 modalities, min / max run over the pairs of the
graph and xi is averaged over them.

The experiments are a registry (``register_experiment``; ``EXPERIMENTS`` maps each name to its
description and run builder). ``run_experiment`` writes DIR/summary.json, DIR/curves.json and, with
plots, DIR/curves.png and DIR/histograms.png. Command line: ``open_clip_sigrel.cli.synth``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from open_clip_sigrel.bias import logit_bias_from_rel_bias, rel_bias_from_logit_bias
from open_clip_sigrel.extras import require
from open_clip_sigrel.io import check_writable_dir
from open_clip_sigrel.loss import (
    GRAPHS,
    NORMALIZATIONS,
    graph_edges,
    multimodal_sigrel_loss,
    normalizer,
    sigrel_loss,
)
from open_clip_sigrel.loss.kernel import LOSS_FORMS, batched_pair_loss
from open_clip_sigrel.metrics.functional import centred_gap_sum, margin_and_rel_bias

BACKENDS = ("batched", "loop")
DEFAULT_B0 = (-10.0, -5.0, 0.0, 5.0, 10.0)
DEFAULT_REL_BIASES = (-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
#: variants of the frozen / modalities experiments: b_rel trained, logit_bias trained, t fixed (--fixed-t)
VARIANTS = ("relative", "absolute", "fixed t")

# Ranges of the numeric knobs, checked before any work. The runs are float32: t (exp of a float32 log t),
# the biases and the learning rate must be finite, non-zero where a ratio or a log needs it, and keep
# t * (s - b_rel) far from float32 overflow (|logit| <= 1e6 * 11). Sizes are bounded by what a dense
# (runs, N, N) block on one machine can hold.
_T_RANGE = (1e-6, 1e6)
_BIAS_LIMIT = 10.0  # |b_rel| (cosine units; a constellation needs |b_rel| <= 1)
_B0_LIMIT = 1e6  # |b0| (logit units)
_INT_RANGES = {"n": (2, 20_000), "dim": (1, 100_000), "steps": (0, 10**8), "seed": (0, 2**62),
               "repeats": (1, 10_000), "record_every": (1, 10**8), "threads": (0, 4096)}
_TUPLE_INT_RANGES = {"ks": (2, 100), "dims": (1, 100_000)}


def _check_float(name: str, value: Any, lo: float, hi: float, *, positive: bool = False) -> None:
    """A finite float in [lo, hi] (positive: also > 0 once rounded to float32, i.e. not underflowing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")
    if positive and not float(torch.tensor(v, dtype=torch.float32)) > 0:
        raise ValueError(f"{name} must be > 0 in float32, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


# ----------------------------------------------------------------------------------------------
# Configuration: every default once (the library signatures, the CLI parser and --help read it)
# ----------------------------------------------------------------------------------------------
def _knob(default: Any, help: str, *, group: str = "protocol", choices: Sequence[str] | None = None) -> Any:
    """A SynthConfig field. The command line is generated from it (open_clip_sigrel.cli.synth): the flag's
    type from the annotation (``tuple[X, ...]``: several X), its default, help, group and choices from here."""
    meta: dict[str, Any] = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SynthConfig:
    """Protocol and experiment knobs of the synthetic runs (defaults: the paper's protocol).

    A knob left at None (``rel_biases``) takes the value the experiment registers for it. Sequence
    knobs are stored as tuples (lists are converted). Each field's help text is in its metadata
    (``open-clip-sigrel synth --help`` shows it).
    """

    n: int = _knob(100, "pairs N")
    dim: int = _knob(10, "embedding dimension d")
    steps: int = _knob(10_000, "Adam steps (full batch)")
    lr: float = _knob(1e-2, "Adam learning rate (all parameters)")
    seed: int = _knob(0, "seed of the initial embeddings")
    repeats: int = _knob(1, "seeds seed .. seed + repeats - 1")
    normalize: str = _knob("pairs", "loss normalisation: mean over N^2 (pairs, the paper's code), / N (batch, "
                           "open_clip) or sum", choices=NORMALIZATIONS)
    record_every: int = _knob(100, "curve resolution (steps)")
    t0: float = _knob(10.0, "initial t (trained runs)")
    backend: str = _knob("batched", "batched: all runs in one tensor program; loop: sigrel_loss per run (reference)",
                         choices=BACKENDS)
    threads: int = _knob(1, "torch threads during the run, the caller's count restored after (small tensors: 1 is "
                         "fastest; 0 leaves it as is)")
    b0: tuple[float, ...] = _knob(DEFAULT_B0, "bias-vs-rel / frozen: starts b0 (abs: logit_bias0 = -b0; rel: "
                                  "b_rel0 = b0 / t0)", group="experiment knobs")
    rel_biases: tuple[float, ...] | None = _knob(None, "fixed b_rel values", group="experiment knobs")
    t_values: tuple[float, ...] = _knob((10.0, 100.0), "fixed-t: frozen t values", group="experiment knobs")
    b_rel0: float = _knob(0.0, "initial b_rel of trained-bias runs (fixed-t, modalities, xi)", group="experiment knobs")
    t0s: tuple[float, ...] = _knob((1.0, 10.0, 100.0), "init-grid: initial t values", group="experiment knobs")
    b_rel0s: tuple[float, ...] = _knob((-0.5, 0.0, 0.5, 1.0), "init-grid: initial b_rel", group="experiment knobs")
    fixed_t: float = _knob(10.0, "frozen: the fixed-t runs' t", group="experiment knobs")
    ks: tuple[int, ...] = _knob((2, 3, 5, 10, 20), "modalities: numbers of modalities", group="experiment knobs")
    graphs: tuple[str, ...] = _knob(GRAPHS, "modalities: pair graphs", group="experiment knobs", choices=GRAPHS)
    dims: tuple[int, ...] = _knob((5, 10, 20, 50), "xi: dimensions", group="experiment knobs")
    variants: tuple[str, ...] = _knob(VARIANTS, "frozen / modalities: which variants to run", group="experiment knobs",
                                      choices=VARIANTS)
    loss_form: str = _knob("exact", "exact: -log sigmoid (softplus); authors: the authors' clipped terms "
                           "-log(sigmoid(z) + 1e-8), -log(1 - sigmoid(z) + 1e-8), for reproduction only",
                           choices=LOSS_FORMS)
    in_loss_normalize: bool = _knob(True, "re-normalise the embeddings inside the loss (F.normalize, the authors' "
                                    "code: a tangent gradient); --no-in-loss-normalize feeds the unit vectors as is")

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))  # frozen, hashable, comparable
        self._check_numbers()
        normalizer(self.normalize, 1, 1)  # raises on an unknown normalisation
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {', '.join(LOSS_FORMS)}, got {self.loss_form!r}")
        if self.backend == "loop" and self.loss_form != "exact":
            raise ValueError("backend 'loop' is the exact loss's reference (sigrel_loss); use backend 'batched' "
                             f"with loss_form {self.loss_form!r}")
        if set(self.variants) - set(VARIANTS) or not self.variants:
            raise ValueError(f"variants must be among {', '.join(VARIANTS)}, got {self.variants}")
        for graph in self.graphs:
            graph_edges(2, graph)
        for k in self.ks:
            graph_edges(k, GRAPHS[0])

    def _check_numbers(self) -> None:
        """Every numeric knob finite, in range and representable in the float32 runs (before any work)."""
        for name, (lo, hi) in _INT_RANGES.items():
            _check_int(name, getattr(self, name), lo, hi)
        for name, (lo, hi) in _TUPLE_INT_RANGES.items():
            for v in self._values(name):
                _check_int(name, v, lo, hi)
        _check_float("lr", self.lr, 0.0, 10.0, positive=True)
        for name in ("t0", "fixed_t", "t_values", "t0s"):
            for v in self._values(name):
                _check_float(name, v, *_T_RANGE, positive=True)
        for name in ("rel_biases", "b_rel0", "b_rel0s"):
            for v in self._values(name):
                _check_float(name, v, -_BIAS_LIMIT, _BIAS_LIMIT)
        for v in self._values("b0"):
            _check_float("b0", v, -_B0_LIMIT, _B0_LIMIT)

    def _values(self, name: str) -> tuple:
        """A knob's values as a tuple (scalar: one; None: none); an empty sequence is an error."""
        v = getattr(self, name)
        if v is None:
            return ()
        if isinstance(v, tuple):
            if not v:
                raise ValueError(f"{name} needs at least one value")
            return v
        return (v,)

    @property
    def seeds(self) -> list[int]:
        """seed, seed + 1, ..., seed + repeats - 1."""
        return [self.seed + i for i in range(self.repeats)]


# ----------------------------------------------------------------------------------------------
# Run specification and the training engine
# ----------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One synthetic run.

    kind: "rel" trains b_rel itself; "abs" trains open_clip's logit_bias.
    t0, b_rel0: initial t and b_rel (an "abs" run starts at the same logits, logit_bias0 = -t0 * b_rel0).
    train_t / train_b: whether log t / the bias are trained; train_u: whether modality 0 (U) is trained.
    """

    name: str
    kind: str = "rel"
    t0: float = SynthConfig.t0
    b_rel0: float = SynthConfig.b_rel0
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
        """open_clip's logit_bias at the start."""
        return logit_bias_from_rel_bias(self.b_rel0, self.t0)


def init_embeddings(seed: int, n: int, dim: int, k: int = 2) -> torch.Tensor:
    """(k, n, dim) float32: i.i.d. Gaussian rows normalised to the sphere, from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.randn(k, n, dim, generator=gen, dtype=torch.float32), dim=-1)


@torch.no_grad()
def _geometry(feats: torch.Tensor, edges: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Per run (R,): min positive and max negative similarity over the graph's pairs, the halved
    margin m* and b*_rel they give, and xi (mean over the edges)."""
    ia = [a for a, _ in edges]
    ic = [c for _, c in edges]
    x, y = feats[:, ia], feats[:, ic]  # (R, E, n, d)
    s = x @ y.transpose(-1, -2)
    n = s.shape[-1]
    min_pos = s.diagonal(dim1=-2, dim2=-1).amin((-1, -2))
    eye = torch.eye(n, dtype=torch.bool)
    max_neg = s.masked_fill(eye, -math.inf).amax((-1, -2)).amax(-1)
    margin, b_star = margin_and_rel_bias(min_pos, max_neg)
    xi = centred_gap_sum(x, y) / n  # per run and edge
    return {"min_pos": min_pos, "max_neg": max_neg, "margin": margin, "b_star": b_star, "xi": xi.mean(-1)}


@torch.no_grad()
def _reference_losses(
    feats: torch.Tensor, t: torch.Tensor, b: torch.Tensor, k: int, graph: str, normalize: str,
    loss_form: str = "exact",
) -> list[float]:
    """Per-run loss values from the project's own loss functions (one call per run, in float64);
    the authors' clipped form from the kernel's batched_pair_loss (float64, averaged over the edges)."""
    out = []
    # float64: a loss of ~1e-6 summed from N^2 float32 terms keeps few correct digits
    feats, t, b = feats.double(), t.double(), b.double()
    if loss_form != "exact":
        edges = graph_edges(k, graph)
        n = feats.shape[-2]
        per_edge = [batched_pair_loss(feats[:, a], feats[:, c], t, b, normalizer(normalize, n, n), form=loss_form)
                    for a, c in edges]
        return (sum(per_edge) / len(edges)).tolist()
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
    n: int = SynthConfig.n,
    dim: int = SynthConfig.dim,
    steps: int = SynthConfig.steps,
    lr: float = SynthConfig.lr,
    normalize: str = SynthConfig.normalize,
    record_every: int = SynthConfig.record_every,
    k: int = 2,
    graph: str = GRAPHS[0],
    backend: str = SynthConfig.backend,
    keep_similarities: bool = True,
    keep_features: bool = False,
    loss_form: str = SynthConfig.loss_form,
    in_loss_normalize: bool = SynthConfig.in_loss_normalize,
) -> list[dict[str, Any]]:
    """Train the runs in ``specs`` together (one stacked tensor program) and return one result each.

    Each result: {"spec": asdict(spec), "final": {...}, "curves": {...}, "pos"/"neg": final similarity
    tensors (only with keep_similarities), "features": final (k, n, dim) embeddings (keep_features)}.
    ``backend="loop"`` computes the gradient by calling the project's ``sigrel_loss`` /
    ``multimodal_sigrel_loss`` once per run (the reference, slower); "batched" uses
    ``loss.batched_sigrel_loss`` (checked equal in the tests). Reported losses always come from the
    project's functions, evaluated in float64 at the record steps. The defaults are SynthConfig's.

    loss_form: "exact" or the authors' clipped terms ("authors", loss.kernel.clipped_pair_terms_).
    in_loss_normalize: the loss sees F.normalize(embeddings) (the authors' code): the same value on the
    unit vectors, but autograd projects the gradient onto the tangent space (no radial component).
    """
    # the same checks (and messages) as a SynthConfig built from these values
    SynthConfig(n=n, dim=dim, steps=steps, lr=lr, normalize=normalize, record_every=record_every, backend=backend,
                loss_form=loss_form, in_loss_normalize=in_loss_normalize)
    for spec in specs:
        _check_float(f"t0 of run {spec.name!r}", spec.t0, *_T_RANGE, positive=True)
        _check_float(f"b_rel0 of run {spec.name!r}", spec.b_rel0, -_B0_LIMIT, _B0_LIMIT)
    edges = graph_edges(k, graph)
    if not specs:
        return []
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
        return t, torch.where(is_abs, rel_bias_from_logit_bias(bias, t), bias)

    norm = float(normalizer(normalize, n, n))

    def step_loss() -> torch.Tensor:
        t, b = scalars()
        f = F.normalize(feats, dim=-1) if in_loss_normalize else feats  # the authors' forward
        if backend == "loop":
            return sum(
                sigrel_loss(f[r, 0], f[r, 1], t[r], b[r], normalize=normalize)
                if k == 2
                else multimodal_sigrel_loss(list(f[r].unbind(0)), t[r], b[r], graph=graph, normalize=normalize)
                for r in range(r_count)
            )
        if k == 2:
            losses = batched_pair_loss(f[:, 0], f[:, 1], t, b, norm, compute_value=False, form=loss_form)
        else:
            x = f[:, ia].reshape(r_count * n_edges, n, dim)
            y = f[:, ic].reshape(r_count * n_edges, n, dim)
            losses = batched_pair_loss(
                x, y, t.repeat_interleave(n_edges), b.repeat_interleave(n_edges), norm,
                compute_value=False, form=loss_form,
            ).view(r_count, n_edges).mean(1)
        return losses.sum()

    curves: dict[str, list] = {key: [] for key in ("step", "loss", "t", "b_rel", "margin", "b_star", "xi")}
    last: dict[str, torch.Tensor] = {}  # the geometry of the latest record (the final one at the end)

    def record(step: int) -> None:
        with torch.no_grad():
            t, b = scalars()
            geo = _geometry(feats.detach(), edges)
            losses = _reference_losses(feats.detach(), t, b, k, graph, normalize, loss_form)
        last.update(geo)
        curves["step"].append(step)
        curves["loss"].append(losses)
        for key, val in (("t", t), ("b_rel", b), ("margin", geo["margin"]), ("b_star", geo["b_star"]),
                         ("xi", geo["xi"])):
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
    min_pos, max_neg = last["min_pos"].tolist(), last["max_neg"].tolist()
    for r, spec in enumerate(specs):
        per_run = {key: [row[r] for row in vals] if key != "step" else list(vals) for key, vals in curves.items()}
        final = {key: per_run[key][-1] for key in per_run if key != "step"}
        final["logit_bias"] = logit_bias_from_rel_bias(final["b_rel"], final["t"])
        final["steps"] = steps
        final["min_pos"], final["max_neg"] = min_pos[r], max_neg[r]
        final["gap"] = min_pos[r] - max_neg[r]  # the un-halved gap 2 m* of the paper's Tables 1-3
        res: dict[str, Any] = {"spec": asdict(spec), "final": final, "curves": per_run}
        if keep_similarities:
            res["pos"] = sims[r].diagonal(dim1=-2, dim2=-1).reshape(-1).clone()
            res["neg"] = sims[r][:, ~eye].reshape(-1).clone()
        if keep_features:
            res["features"] = fin[r].clone()
        results.append(res)
    return results


# ----------------------------------------------------------------------------------------------
# Experiments: a registry of run builders
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Runs that share shapes (trained together)."""

    specs: list[RunSpec]
    dim: int
    k: int = 2
    graph: str = GRAPHS[0]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its runs are ``build(config)``; ``defaults`` fill the config knobs left
    at None (e.g. the b_rel values of fixed-rel-bias)."""

    name: str
    description: str
    build: Callable[[SynthConfig], list[Batch]]
    defaults: Mapping[str, Any]
    knobs: tuple[str, ...] | None = None  # the "experiment knobs" it reads (its --help shows these); None: all


_REGISTRY: dict[str, Experiment] = {}
#: name -> Experiment, in registration order (a read-only view of the registry)
EXPERIMENTS: Mapping[str, Experiment] = MappingProxyType(_REGISTRY)


def register_experiment(name: str, description: str, *, knobs: Sequence[str] | None = None, **defaults: Any) -> Callable:
    """Decorator: register ``build(config: SynthConfig) -> list[Batch]`` as experiment ``name``.

    ``defaults``: SynthConfig knobs this experiment sets when the caller leaves them at None.
    ``knobs``: the experiment knobs it reads (its own --help lists only these); None: every knob.
    """
    known = {f.name for f in fields(SynthConfig)}
    if set(defaults) - known or set(knobs or ()) - known:
        raise TypeError(f"unknown SynthConfig fields in defaults: {sorted((set(defaults) | set(knobs or ())) - known)}")

    def decorator(build: Callable[[SynthConfig], list[Batch]]) -> Callable[[SynthConfig], list[Batch]]:
        if name in _REGISTRY:
            raise ValueError(f"experiment {name!r} is already registered")
        _REGISTRY[name] = Experiment(name, description, build, MappingProxyType(dict(defaults)),
                                     None if knobs is None else tuple(knobs))
        return build

    return decorator


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``; ValueError listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(_REGISTRY)}") from None


def _sfx(cfg: SynthConfig, seed: int) -> str:
    """Run-name suffix naming the seed when there are several."""
    return f" s{seed}" if cfg.repeats > 1 else ""


@register_experiment("bias-vs-rel", "absolute logit_bias vs relative b_rel, trained from the same logits (--b0)",
                     knobs=("b0",))
def _bias_vs_rel(cfg: SynthConfig) -> list[Batch]:
    # same starting logits: logit_bias0 = -b0 (abs), b_rel0 = b0 / t0 (rel)
    specs = [RunSpec(f"{kind} b0={b0:g}{_sfx(cfg, seed)}", kind=kind, t0=cfg.t0, b_rel0=b0 / cfg.t0, seed=seed,
                     group=kind, info={"b0": b0})
             for seed in cfg.seeds for b0 in cfg.b0 for kind in ("abs", "rel")]
    return [Batch(specs, cfg.dim)]


@register_experiment("fixed-rel-bias", "b_rel frozen at each of --rel-biases; t and the embeddings trained",
                     knobs=("rel_biases",), rel_biases=DEFAULT_REL_BIASES)
def _fixed_rel_bias(cfg: SynthConfig) -> list[Batch]:
    specs = [RunSpec(f"b_rel={b:g} fixed{_sfx(cfg, seed)}", t0=cfg.t0, b_rel0=b, train_b=False, seed=seed,
                     group="fixed b_rel")
             for seed in cfg.seeds for b in cfg.rel_biases]
    return [Batch(specs, cfg.dim)]


@register_experiment("fixed-t", "t frozen (each of --t-values) or trained, crossed with b_rel frozen "
                     "(each of --rel-biases) or trained", knobs=("t_values", "rel_biases", "b_rel0"),
                     rel_biases=(0.0, 0.5))
def _fixed_t(cfg: SynthConfig) -> list[Batch]:
    t_modes = [(f"t={tv:g} fixed", tv, False) for tv in cfg.t_values] + [(f"t0={cfg.t0:g} trained", cfg.t0, True)]
    b_modes = [(f"b_rel={b:g} fixed", b, False) for b in cfg.rel_biases]
    b_modes.append((f"b_rel0={cfg.b_rel0:g} trained", cfg.b_rel0, True))
    specs = [RunSpec(f"{t_name}, {b_name}{_sfx(cfg, seed)}", t0=tv, b_rel0=bv, train_t=t_train, train_b=b_train,
                     seed=seed, group=t_name)
             for seed in cfg.seeds for t_name, tv, t_train in t_modes for b_name, bv, b_train in b_modes]
    return [Batch(specs, cfg.dim)]


@register_experiment("init-grid", "t and b_rel trained from a grid of starts (--t0s x --b-rel0s)",
                     knobs=("t0s", "b_rel0s"))
def _init_grid(cfg: SynthConfig) -> list[Batch]:
    specs = [RunSpec(f"t0={tv:g} b_rel0={bv:g}{_sfx(cfg, seed)}", t0=tv, b_rel0=bv, seed=seed, group=f"t0={tv:g}")
             for seed in cfg.seeds for tv in cfg.t0s for bv in cfg.b_rel0s]
    return [Batch(specs, cfg.dim)]


@register_experiment("frozen", "modality 0 frozen: relative b_rel, absolute logit_bias and fixed t (t = --fixed-t, "
                     "b_rel frozen too), each from every --b0", knobs=("b0", "fixed_t", "variants"))
def _frozen(cfg: SynthConfig) -> list[Batch]:
    specs = []
    for seed in cfg.seeds:
        for b0 in cfg.b0:
            sfx = _sfx(cfg, seed)
            # same starting logits t * s - b0 in every variant: b_rel0 = b0 / (the run's t0)
            runs = {"relative": RunSpec(f"rel b0={b0:g}{sfx}", kind="rel", t0=cfg.t0, b_rel0=b0 / cfg.t0),
                    "absolute": RunSpec(f"abs b0={b0:g}{sfx}", kind="abs", t0=cfg.t0, b_rel0=b0 / cfg.t0),
                    "fixed t": RunSpec(f"t={cfg.fixed_t:g} fixed b0={b0:g}{sfx}", t0=cfg.fixed_t,
                                       b_rel0=b0 / cfg.fixed_t, train_t=False, train_b=False)}
            for variant in cfg.variants:
                spec = runs[variant]
                spec.train_u, spec.seed, spec.group, spec.info = False, seed, variant, {"b0": b0, "variant": variant}
                specs.append(spec)
    return [Batch(specs, cfg.dim)]


@register_experiment("modalities", "k modalities sharing one (t, b_rel), paired by a graph (--ks x --graphs); "
                     "variants: relative b_rel, absolute logit_bias, fixed t (--fixed-t, b_rel trained)",
                     knobs=("ks", "graphs", "b_rel0", "fixed_t", "variants"))
def _modalities(cfg: SynthConfig) -> list[Batch]:
    batches = []
    for k in cfg.ks:
        for graph in cfg.graphs:
            if k == 2 and graph != cfg.graphs[0]:
                continue  # k = 2: every graph is the single edge
            specs = []
            for seed in cfg.seeds:
                for variant in cfg.variants:
                    kind, t0, train_t = {"relative": ("rel", cfg.t0, True), "absolute": ("abs", cfg.t0, True),
                                         "fixed t": ("rel", cfg.fixed_t, False)}[variant]
                    tag = "" if variant == "relative" else f" {variant}"
                    specs.append(RunSpec(f"k={k} {graph}{tag}{_sfx(cfg, seed)}", kind=kind, t0=t0, b_rel0=cfg.b_rel0,
                                         train_t=train_t, seed=seed, group=graph,
                                         info={"k": k, "graph": graph, "variant": variant}))
            batches.append(Batch(specs, cfg.dim, k=int(k), graph=graph))
    return batches


@register_experiment("xi", "the centred gap xi of trained runs against the dimension (--dims); b_rel fixed at "
                     "--b-rel0 (0: the paper's)", knobs=("dims", "b_rel0"))
def _xi(cfg: SynthConfig) -> list[Batch]:
    return [Batch([RunSpec(f"d={d}{_sfx(cfg, seed)}", t0=cfg.t0, b_rel0=cfg.b_rel0, train_b=False, seed=seed,
                           group=f"d={d}", info={"dim": int(d)}) for seed in cfg.seeds], int(d))
            for d in cfg.dims]


def resolve_config(experiment: str, config: SynthConfig | None = None, **options: Any) -> SynthConfig:
    """``config`` (default SynthConfig()) with ``options`` applied (None: keep) and the experiment's
    defaults filled in. ValueError for an unknown experiment or a bad value, TypeError for an unknown option."""
    exp = get_experiment(experiment)
    known = {f.name for f in fields(SynthConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}; SynthConfig has {', '.join(sorted(known))}")
    cfg = replace(config or SynthConfig(), **{key: v for key, v in options.items() if v is not None})
    fill = {key: v for key, v in exp.defaults.items() if getattr(cfg, key) is None}
    return replace(cfg, **fill) if fill else cfg


def build_batches(experiment: str, config: SynthConfig | None = None, **options: Any) -> list[Batch]:
    """The runs of an experiment, grouped into batches of equal shapes (see ``resolve_config``)."""
    return get_experiment(experiment).build(resolve_config(experiment, config, **options))


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block (0: unchanged), restored after."""
    old = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(old)


def _jsonable_config(cfg: SynthConfig) -> dict[str, Any]:
    return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(cfg).items()}


def check_output_dir(output: str | os.PathLike) -> str:
    """``output`` as a str, ValueError unless it is (or can be created as) a writable directory; creates nothing."""
    return check_writable_dir(output, what="--output")


def write_files(output: str, writers: Mapping[str, Callable[[str], None]]) -> None:
    """Each ``writers[name](tmp_path)`` writes a temporary file; only when all succeeded are they renamed
    to output/name (so a failing plot or a full disk leaves no half set). Temporaries are removed on failure."""
    os.makedirs(output, exist_ok=True)
    done: list[tuple[str, str]] = []
    try:
        for name, write in writers.items():
            tmp = os.path.join(output, f".{name}.part")
            done.append((tmp, os.path.join(output, name)))
            write(tmp)
    except BaseException:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in done:
        os.replace(tmp, final)


def _json_writer(doc: Any, **kwargs: Any) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w") as fh:
            json.dump(doc, fh, **kwargs)
    return write


def run_experiment(
    experiment: str, output: str | os.PathLike | None = None, plots: bool = True, config: SynthConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run one registered experiment; returns the summary dict.

    ``config`` / ``options``: a SynthConfig and field overrides (see ``resolve_config``). With ``output``
    the summary is also written to output/summary.json, the curves to output/curves.json and, with
    ``plots``, the figures to output/curves.png and output/histograms.png (matplotlib, the 'plots' extra:
    checked before training). torch's thread count is set to ``threads`` for the run and restored.
    """
    cfg = resolve_config(experiment, config, **options)
    if output:
        output = check_output_dir(output)  # before minutes of training, not after
    if output and plots:
        require("matplotlib", "plots")  # fail before minutes of training, not after
    batches = get_experiment(experiment).build(cfg)
    results: list[dict[str, Any]] = []
    batch_info = []
    start = time.perf_counter()
    with _torch_threads(cfg.threads):
        for batch in batches:
            t_b = time.perf_counter()
            res = train_runs(
                batch.specs, n=cfg.n, dim=batch.dim, steps=cfg.steps, lr=cfg.lr, normalize=cfg.normalize,
                record_every=cfg.record_every, k=batch.k, graph=batch.graph, backend=cfg.backend,
                keep_similarities=bool(output and plots), loss_form=cfg.loss_form,
                in_loss_normalize=cfg.in_loss_normalize,
            )
            wall = time.perf_counter() - t_b
            for item in res:
                item.update(dim=batch.dim, k=batch.k, graph=batch.graph)
            results.extend(res)
            batch_info.append({"dim": batch.dim, "k": batch.k, "graph": batch.graph, "runs": len(batch.specs),
                               "wall_time_s": round(wall, 3)})
    wall_total = time.perf_counter() - start
    summary = {
        "experiment": experiment,
        "config": {**_jsonable_config(cfg), "torch": torch.__version__, "protocol": (
            "U, V (and further modalities) are the parameters: Gaussian rows normalised to the sphere; Adam on "
            "log t, the bias and the embeddings; all N^2 pairs per step; re-projection after every step"),
            "columns": {"margin": "halved margin m* = (min pos - max neg) / 2",
                        "gap": "un-halved gap min pos - max neg = 2 m* (the paper's Tables 1-3)"}},
        "seeds": sorted({item["spec"]["seed"] for item in results}),
        "wall_time_s": round(wall_total, 3),
        "batches": batch_info,
        "runs": [_run_summary(item) for item in results],
    }
    if output:
        writers: dict[str, Callable[[str], None]] = {}
        if plots:
            writers["curves.png"] = lambda path: plot_curves(results, path, title=experiment)
            writers["histograms.png"] = lambda path: plot_histograms(results, path, title=experiment)
        writers["curves.json"] = _json_writer({"experiment": experiment, "runs": [
            {"name": item["spec"]["name"], **item["curves"]} for item in results]})
        writers["summary.json"] = _json_writer(summary, indent=2)
        write_files(output, writers)
    return summary


def _run_summary(item: dict[str, Any]) -> dict[str, Any]:
    spec = item["spec"]
    return {
        "name": spec["name"], "group": spec["group"], "kind": spec["kind"], "seed": spec["seed"],
        "t0": spec["t0"], "b_rel0": spec["b_rel0"], "logit_bias0": logit_bias_from_rel_bias(spec["b_rel0"], spec["t0"]),
        "train_t": spec["train_t"], "train_b": spec["train_b"], "train_u": spec["train_u"],
        "dim": item["dim"], "k": item["k"], "graph": item["graph"], "info": spec["info"],
        "final": item["final"],
    }


# ----------------------------------------------------------------------------------------------
# Figures (an Agg canvas per figure: no pyplot state, the caller's matplotlib backend untouched)
# ----------------------------------------------------------------------------------------------
def _figure(**kwargs: Any):
    figure = require("matplotlib.figure", "plots")
    agg = require("matplotlib.backends.backend_agg", "plots")
    fig = figure.Figure(**kwargs)
    agg.FigureCanvasAgg(fig)
    return fig


def _colormap(name: str):
    return require("matplotlib", "plots").colormaps[name]


def plot_curves(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """curves.png: loss (log), t (log), b_rel, halved margin m* and xi over steps, every run."""
    keys = (("loss", "loss (log)", True), ("t", "t (log)", True), ("b_rel", "b_rel = -logit_bias / t", False),
            ("margin", "halved margin m*", False), ("xi", "xi", False))
    fig = _figure(figsize=(4.2 * len(keys), 4.2))
    axes = fig.subplots(1, len(keys))
    # runs that share a start (same b0 / k) share a colour; absolute-bias runs are dashed

    def colour_key(item: dict[str, Any]) -> Any:
        info = item["spec"]["info"]
        return info.get("b0", info.get("k", item["spec"]["name"]))

    colour_keys: list[Any] = []
    for item in results:
        if colour_key(item) not in colour_keys:
            colour_keys.append(colour_key(item))
    cmap = _colormap("tab20" if len(colour_keys) > 10 else "tab10")
    for item in results:
        cur = item["curves"]
        style = "--" if item["spec"]["kind"] == "abs" else ":" if not item["spec"]["train_t"] else "-"
        colour = cmap(colour_keys.index(colour_key(item)) % cmap.N)
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
    fig.savefig(path, dpi=110, format="png")


def plot_histograms(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """histograms.png: final positive vs negative similarities per run, with b_rel and b_rel +- m*."""
    count = len(results)
    cols = min(5, count)
    rows = math.ceil(count / cols)
    fig = _figure(figsize=(3.4 * cols, 2.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
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
    fig.savefig(path, dpi=100, format="png")
