"""`open-clip-sigrel bounds --n N --margin M [--rel-bias B] [--dim D] [--json]`: constellation bounds.

Parsing, printing and exit codes only; the bounds are open_clip_sigrel.tools.bounds.constellation_bounds'.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np

from open_clip_sigrel.io import format_table
from open_clip_sigrel.tools.bounds import ASYMPTOTIC, RIGOROUS, constellation_bounds


def _count(text: str) -> int:
    """Integer argument that also accepts 1e10-style notation."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if abs(value) > 2**53:  # beyond exact float64 integers (the bounds compute in float64)
        raise argparse.ArgumentTypeError(f"too large (at most 2^53 = {2**53:.4g}): {text!r}")
    return int(value)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `open-clip-sigrel bounds` (the optional ones default to constellation_bounds' None)."""
    parser.add_argument("--n", type=_count, required=True, help="number of pairs N (e.g. 1e6)")
    parser.add_argument("--margin", type=float, required=True, help="halved margin m")
    parser.add_argument("--rel-bias", type=float, default=None,
                        help="relative bias b_rel (default: b_rel-free bounds, best b_rel)")
    parser.add_argument("--dim", type=_count, default=None, help="also bound the largest N in this dimension")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if not math.isfinite(v):
            return None  # unbounded
        return int(v) if v.is_integer() and abs(v) < 2**53 else v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "unbounded"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def report(res: dict[str, Any]) -> str:
    """Human-readable report of ``constellation_bounds``' result."""
    inp, fr, asy, rig = res["input"], res["feasible_region"], res["asymptotic"], res["rigorous"]
    b = "free (best b_rel)" if inp["rel_bias"] is None else f"{inp['rel_bias']:g}"
    rows: list[tuple[str, str, str]] = []
    rows.append(("feasible region (Thm 3.4)", "yes" if fr["feasible"] else "no", RIGOROUS))
    for cond in fr["conditions"]:
        rows.append((f"  {cond['inequality']}", "holds" if cond["holds"] else "FAILS", RIGOROUS))
    rows.append(("  largest feasible m", _fmt(fr["max_margin"]), RIGOROUS))
    rows.append(("  most pairs in any dimension", _fmt(fr["max_n_any_dim"]), RIGOROUS))
    rows.append(("  exponential size in d possible", "yes" if fr["exponential_size_possible"] else "no", RIGOROUS))
    rows.append((f"necessary d (Thm 3.5, b_rel = {asy['rel_bias_used']:g})", _fmt(asy["necessary_dim"]), ASYMPTOTIC))
    rows.append(("sufficient d (Thm 3.3, Shannon-Wyner)", _fmt(asy["sufficient_dim"]), ASYMPTOTIC))
    dm = rig["dim_min"]
    rows.append(("smallest d: lower bound", _fmt(dm["lower"]), RIGOROUS))
    rows.append(("smallest d: upper bound", _fmt(dm["upper"]), RIGOROUS))
    if "max_n" in rig:
        mn = rig["max_n"]
        rows.append((f"largest N in d = {mn['dim']}: lower bound", _fmt(mn["lower"]), RIGOROUS))
        rows.append((f"largest N in d = {mn['dim']}: upper bound", _fmt(mn["upper"]), RIGOROUS))
        if asy.get("log10_max_n_necessary") is not None:
            rows.append((f"largest N in d = {mn['dim']} (Thm 3.5): log10", f"{asy['log10_max_n_necessary']:.4g}",
                         ASYMPTOTIC))
        if asy.get("log10_n_sufficient") is not None:
            rows.append((f"N reachable in d = {mn['dim']} (Thm 3.3): log10", f"{asy['log10_n_sufficient']:.4g}",
                         ASYMPTOTIC))
    lines = [f"(m, b_rel)-constellations: N = {inp['n']:,}, m = {inp['margin']:g}, b_rel = {b}, "
             f"c = 1 - 2m = {res['c']:g}", ""]
    lines.append(format_table(("quantity", "value", "label"), [(q, v, f"[{label}]") for q, v, label in rows]))
    lines += ["", f"d_min in [{_fmt(dm['lower'])}, {_fmt(dm['upper'])}]  ({rig['scope']}) [rigorous]",
              f"  lower: {dm['lower_reason']}", f"  upper: {dm['upper_reason']}"]
    if "max_n" in rig:
        mn = rig["max_n"]
        lines += [f"max N in d = {mn['dim']} in [{_fmt(mn['lower'])}, {_fmt(mn['upper'])}] [rigorous]",
                  f"  lower: {mn['lower_reason']}", f"  upper: {mn['upper_reason']}"]
    lines.append(f"asymptotic: {asy['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry of `open-clip-sigrel bounds`: 0 on success, 2 on invalid input, 1 without scipy."""
    try:
        res = constellation_bounds(args.n, args.margin, args.rel_bias, args.dim)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # scipy: the research extra
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_jsonable(res), indent=2))
    else:
        print(report(res))
    return 0
