"""The ``--sigrel-*`` training options: their flags, defaults and every check before work starts.

Library code: a bad combination raises ``SigrelOptionError`` (a ValueError) naming the flag; the
command lines (``open-clip-sigrel-train``, the patched open_clip's parse_args) turn it into argparse's
exit status 2.
"""
from __future__ import annotations

import argparse
import math

import torch

from open_clip_sigrel.configs import SigrelConfig, get_sigrel_config
from open_clip_sigrel.loss import DIST_IMPLS, NORMALIZATIONS
from open_clip_sigrel.metrics.geometry import PRESETS as GEOMETRY_PRESETS

LOSSES = ("clip", "siglip", "sigrel")
# t0 and b_rel0 of SigLIP (logit_bias0 = -t0 * b_rel0 = -10): the sigrel block's defaults
DEFAULT_INIT_LOGIT_SCALE = SigrelConfig.init_t
DEFAULT_INIT_REL_BIAS = SigrelConfig.init_rel_bias
OPEN_CLIP_MAX_LOGIT_SCALE = 100.0


class SigrelOptionError(ValueError):
    """A training option (or combination) that cannot work; the message names the flag."""


def add_sigrel_arguments(parser) -> None:
    """The ``--sigrel-*`` flags, on any argparse parser or group (also the patched open_clip's)."""
    g = parser
    g.add_argument("--sigrel-init-logit-scale", type=float, default=None,
                   help=f"initial t = exp(logit_scale), not log t (default {DEFAULT_INIT_LOGIT_SCALE:g}, or the "
                   "model config's sigrel block; with --pretrained: the checkpoint's t)")
    g.add_argument("--sigrel-init-rel-bias", type=float, default=None,
                   help=f"initial b_rel; logits = t * (s - b_rel) (default {DEFAULT_INIT_REL_BIAS:g}, or the model "
                   "config's; with --pretrained: -logit_bias / t of the checkpoint when it has a bias)")
    g.add_argument("--sigrel-fixed-rel-bias", action="store_true",
                   help="freeze b_rel and train t (the paper's 'fixed relative bias')")
    g.add_argument("--sigrel-fixed-logit-scale", action="store_true", help="freeze t")
    g.add_argument("--sigrel-max-logit-scale", type=float, default=None,
                   help=f"upper clamp of t after each step (open_clip's is {OPEN_CLIP_MAX_LOGIT_SCALE:g}); "
                   "'inf' lifts it. Default: unchanged (or the model config's)")
    g.add_argument("--sigrel-normalize", choices=NORMALIZATIONS, default=None,
                   help="loss normalisation: batch = sum / local B (open_clip's), pairs = mean over pairs "
                   "(the paper's code), sum (default batch)")
    g.add_argument("--sigrel-chunk-size", type=int, default=None,
                   help="image rows per loss block (default: about 4M logits per block)")
    g.add_argument("--sigrel-geometry", choices=tuple(GEOMETRY_PRESETS), default="cheap",
                   help="geometry metrics added to open_clip's evaluation: cheap (default: all but the exact "
                   "trimmed percentile and the exact separability test), full (every group), off")
    g.add_argument("--sigrel-max-bad-samples", type=int, default=0,
                   help="webdataset samples a data-loader worker may skip as unreadable per epoch before the run "
                   "stops (default 0: the first corrupt sample stops it, naming the shard); the skips are logged. "
                   "Any --loss")
    g.add_argument("--sigrel-no-geometry", dest="sigrel_geometry", action="store_const", const="off",
                   help="same as --sigrel-geometry off")


# The flags only --loss sigrel reads (the geometry, the clamp of t and the data guard serve any loss).
SIGREL_ONLY_FLAGS = {
    "sigrel_init_logit_scale": None, "sigrel_init_rel_bias": None, "sigrel_fixed_rel_bias": False,
    "sigrel_fixed_logit_scale": False, "sigrel_normalize": None, "sigrel_chunk_size": None,
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _float32(name: str, value: float) -> float:
    """The value as the model holds it (float32): finite, and not rounded to 0 when it was not 0."""
    held = float(torch.tensor(value, dtype=torch.float32))
    if not math.isfinite(held) or (held == 0.0) != (value == 0.0):
        raise SigrelOptionError(f"{name} {value!r} is not representable in float32 (the model's precision): "
                                f"it becomes {held!r}")
    return held


def resolve_args(args: argparse.Namespace) -> None:
    """Checks every combination before any work starts, and fills in the sigrel settings."""
    if args.loss_dist_impl is not None and args.loss_dist_impl not in DIST_IMPLS:
        raise SigrelOptionError(f"--loss-dist-impl {args.loss_dist_impl!r} is not one of {', '.join(DIST_IMPLS)}")
    if args.loss == "clip" and args.siglip:
        raise SigrelOptionError("--siglip together with --loss clip: choose one loss")
    if args.loss == "sigrel" and args.siglip:
        raise SigrelOptionError("--siglip together with --loss sigrel: --loss sigrel replaces --siglip (same starting logits)")
    if args.loss == "siglip":
        args.siglip = True
    if getattr(args, "accum_freq", 1) < 1:
        raise SigrelOptionError(f"--accum-freq must be >= 1, got {args.accum_freq}")
    if getattr(args, "sigrel_max_bad_samples", 0) < 0:
        raise SigrelOptionError(f"--sigrel-max-bad-samples must be >= 0, got {args.sigrel_max_bad_samples}")
    if args.sigrel_max_logit_scale is not None:
        _check_max(args.sigrel_max_logit_scale)
    if args.loss != "sigrel":
        loss = args.loss or ("siglip" if args.siglip else "clip")
        given = [_flag(k) for k, default in SIGREL_ONLY_FLAGS.items() if getattr(args, k, default) != default]
        if given:
            raise SigrelOptionError(f"{', '.join(given)} only acts with --loss sigrel; this run's loss is {loss}, "
                                    "which would ignore it")
        return
    if "coca" in args.model.lower():
        raise SigrelOptionError(f"--loss sigrel does not support CoCa models ({args.model}): their loss adds a captioning term")
    if args.distill_model is not None or args.distill_pretrained is not None:
        raise SigrelOptionError("--loss sigrel does not support --distill-model / --distill-pretrained")
    if getattr(args, "horovod", False):
        raise SigrelOptionError("--loss sigrel does not support --horovod; use torchrun (torch.distributed)")
    if args.sigrel_normalize is None:
        args.sigrel_normalize = "batch"
    if args.sigrel_chunk_size is not None and args.sigrel_chunk_size < 1:
        raise SigrelOptionError(f"--sigrel-chunk-size must be >= 1, got {args.sigrel_chunk_size}")

    block = get_sigrel_config(args.model)  # the model config's sigrel block (its defaults if none)
    args.sigrel_fixed_rel_bias = args.sigrel_fixed_rel_bias or block.fixed_rel_bias
    args.sigrel_fixed_logit_scale = args.sigrel_fixed_logit_scale or block.fixed_logit_scale
    if args.sigrel_max_logit_scale is None:
        args.sigrel_max_logit_scale = block.max_t
    # Explicit values override the checkpoint in a fine-tune; defaults do not.
    args.sigrel_explicit_init = {
        "logit_scale": args.sigrel_init_logit_scale is not None,
        "rel_bias": args.sigrel_init_rel_bias is not None,
    }
    if args.sigrel_init_logit_scale is None:
        args.sigrel_init_logit_scale = block.init_t
    if args.sigrel_init_rel_bias is None:
        args.sigrel_init_rel_bias = block.init_rel_bias
    t0, b0 = args.sigrel_init_logit_scale, args.sigrel_init_rel_bias
    if not math.isfinite(t0) or t0 <= 0:
        raise SigrelOptionError(f"--sigrel-init-logit-scale is t = exp(logit_scale) and must be finite and > 0, got {t0}")
    if not math.isfinite(b0):
        raise SigrelOptionError(f"--sigrel-init-rel-bias must be finite, got {b0}")
    _float32("--sigrel-init-logit-scale", t0)
    _float32("--sigrel-init-rel-bias", b0)
    _float32("logit_bias = -t * b_rel of --sigrel-init-logit-scale and --sigrel-init-rel-bias", -t0 * b0)
    check_t_in_clamp(t0, args, "--sigrel-init-logit-scale")


def t_clamp(args: argparse.Namespace) -> float:
    """The upper clamp of t that the training loop applies after every optimizer step."""
    return args.sigrel_max_logit_scale or OPEN_CLIP_MAX_LOGIT_SCALE


def check_t_in_clamp(t: float, args: argparse.Namespace, source: str) -> None:
    """open_clip clamps log t to [0, ln t_max] after every step: a t outside would be changed silently
    (a fixed one too: the clamp acts on the tensor), so it is an error before work."""
    t_max = t_clamp(args)
    if 1.0 - 1e-6 <= t <= t_max * (1.0 + 1e-6):  # float32 rounding of exp(log t) passes
        return
    what = "fixed t" if args.sigrel_fixed_logit_scale else "t"
    fix = (f"pass --sigrel-max-logit-scale {t:g} (or inf) to lift the clamp" if t > t_max
           else "t below 1 cannot be kept: start at t >= 1")
    raise SigrelOptionError(f"{what} = {t:g} ({source}) lies outside the clamp [1, {t_max:g}] that the training loop "
                            f"applies after every step, which would change it silently; {fix}")


def _check_max(value: float) -> None:
    if math.isnan(value) or value < 1.0:
        raise SigrelOptionError(f"--sigrel-max-logit-scale is t and must be >= 1 (or inf), got {value}")
    if math.isfinite(value):
        _float32("--sigrel-max-logit-scale", value)
