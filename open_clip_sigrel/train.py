"""Training entry: open_clip_train.main with ``--loss {clip,siglip,sigrel}``, unforked.

    open-clip-sigrel-train --loss sigrel --train-data ... --model ViT-B-16-sigrel ...
    torchrun --nproc_per_node 8 -m open_clip_sigrel.train --loss sigrel ...

open_clip_train.main imports its helpers into its own namespace, so this module swaps those
names (and a few that open_clip_train.train looks up at call time) for the duration of one run:

  parse_args                   plugin flags are split off first (argparse would read ``--loss`` as
                               a prefix of ``--loss-dist-impl``), then validated with open_clip's.
  create_model_and_transforms  a sigrel model gets its trainable ``rel_bias`` (open_clip_sigrel.model).
  create_loss                  ``SigRelLoss`` for --loss sigrel, wrapped to stop on a non-finite loss.
  train_one_epoch              knows the epoch / step for logs and errors.
  train.get_clip_metrics       adds the geometry metrics to every open_clip evaluation.
  train.unwrap_model           only with --sigrel-max-logit-scale: open_clip's fixed clamp of t at 100.
  torch DDP                    no ``device_ids`` on CPU (stock 3.3.0 passes them and fails under gloo).
  pt_load                      checkpoints are read with weights_only=True.

Without ``--loss`` the training is exactly open_clip's (the geometry metrics are added to its logs).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn

from open_clip_sigrel.loss import NORMALIZATIONS, SigRelLoss
from open_clip_sigrel.model import enable_rel_bias, has_rel_bias
from open_clip_sigrel.model_config import get_sigrel_block, register_shipped_configs

LOSSES = ("clip", "siglip", "sigrel")
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
DEFAULT_INIT_LOGIT_SCALE = 10.0  # t0 and b_rel0 of SigLIP: logit_bias0 = -t0 * b_rel0 = -10
DEFAULT_INIT_REL_BIAS = 1.0
OPEN_CLIP_MAX_LOGIT_SCALE = 100.0


def build_plugin_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="open-clip-sigrel-train",
        add_help=False,
        allow_abbrev=False,  # never swallow a prefix of an open_clip flag
        description="open_clip training with the relative-bias sigmoid loss. "
        "All other flags are open_clip_train's own.",
    )
    g = p.add_argument_group("open_clip_sigrel")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="clip (softmax), siglip (same as --siglip) or sigrel (relative-bias sigmoid). "
                   "Default: open_clip's own choice (--siglip or clip).")
    add_sigrel_arguments(g)
    return p


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
    g.add_argument("--sigrel-normalize", choices=NORMALIZATIONS, default="batch",
                   help="loss normalisation: batch = sum / local B (open_clip's), pairs = mean over pairs "
                   "(the paper's code), sum")
    g.add_argument("--sigrel-chunk-size", type=int, default=None,
                   help="image rows per loss block (default: about 4M logits per block)")
    g.add_argument("--sigrel-no-geometry", action="store_true",
                   help="do not add geometry metrics to open_clip's evaluation")


def _fail(message: str) -> None:
    print(f"open-clip-sigrel-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str], stock_parse_args=None) -> argparse.Namespace:
    """Plugin flags first, then open_clip_train.params.parse_args on the rest; validated together."""
    if stock_parse_args is None:
        from open_clip_train.params import parse_args as stock_parse_args
    plugin = build_plugin_parser()
    if any(a in ("-h", "--help") for a in argv):
        plugin.print_help()
        print("\nopen_clip_train flags:\n")
        stock_parse_args(["--help"])
    ours, rest = plugin.parse_known_args(argv)
    register_shipped_configs()  # sigrel-tiny, ViT-B-16-sigrel: usable with any --loss
    args = stock_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    resolve_args(args)
    return args


def resolve_args(args: argparse.Namespace) -> None:
    """Checks every combination before any work starts, and fills in the sigrel settings."""
    if args.loss_dist_impl is not None and args.loss_dist_impl not in DIST_IMPLS:
        _fail(f"--loss-dist-impl {args.loss_dist_impl!r} is not one of {', '.join(DIST_IMPLS)}")
    if args.loss == "clip" and args.siglip:
        _fail("--siglip together with --loss clip: choose one loss")
    if args.loss == "sigrel" and args.siglip:
        _fail("--siglip together with --loss sigrel: --loss sigrel replaces --siglip (same starting logits)")
    if args.loss == "siglip":
        args.siglip = True
    if args.loss != "sigrel":
        if args.sigrel_max_logit_scale is not None:
            _check_max(args.sigrel_max_logit_scale)
        return
    if "coca" in args.model.lower():
        _fail(f"--loss sigrel does not support CoCa models ({args.model}): their loss adds a captioning term")
    if args.distill_model is not None or args.distill_pretrained is not None:
        _fail("--loss sigrel does not support --distill-model / --distill-pretrained")
    if args.horovod:
        _fail("--loss sigrel does not support --horovod; use torchrun (torch.distributed)")
    if args.sigrel_chunk_size is not None and args.sigrel_chunk_size < 1:
        _fail(f"--sigrel-chunk-size must be >= 1, got {args.sigrel_chunk_size}")

    block = get_sigrel_block(args.model)
    args.sigrel_fixed_rel_bias = args.sigrel_fixed_rel_bias or block.get("fixed_rel_bias", False)
    args.sigrel_fixed_logit_scale = args.sigrel_fixed_logit_scale or block.get("fixed_logit_scale", False)
    if args.sigrel_max_logit_scale is None:
        args.sigrel_max_logit_scale = block.get("max_logit_scale")
    # Explicit values override the checkpoint in a fine-tune; defaults do not.
    args.sigrel_explicit_init = {
        "logit_scale": args.sigrel_init_logit_scale is not None,
        "rel_bias": args.sigrel_init_rel_bias is not None,
    }
    if args.sigrel_init_logit_scale is None:
        args.sigrel_init_logit_scale = block.get("init_logit_scale", DEFAULT_INIT_LOGIT_SCALE)
    if args.sigrel_init_rel_bias is None:
        args.sigrel_init_rel_bias = block.get("init_rel_bias", DEFAULT_INIT_REL_BIAS)
    t0, b0 = args.sigrel_init_logit_scale, args.sigrel_init_rel_bias
    if not math.isfinite(t0) or t0 <= 0:
        _fail(f"--sigrel-init-logit-scale is t = exp(logit_scale) and must be finite and > 0, got {t0}")
    if not math.isfinite(b0):
        _fail(f"--sigrel-init-rel-bias must be finite, got {b0}")
    if args.sigrel_max_logit_scale is not None:
        _check_max(args.sigrel_max_logit_scale)
    t_max = args.sigrel_max_logit_scale or OPEN_CLIP_MAX_LOGIT_SCALE
    if args.sigrel_fixed_logit_scale and not 1.0 <= t0 <= t_max:
        _fail(f"fixed t = {t0:g} lies outside the clamp [1, {t_max:g}] applied after each step; "
              "set --sigrel-max-logit-scale")


def _check_max(value: float) -> None:
    if math.isnan(value) or value < 1.0:
        _fail(f"--sigrel-max-logit-scale is t and must be >= 1 (or inf), got {value}")


# ---------------------------------------------------------------- the run's state and hooks


class SigrelRun:
    """What the swapped-in functions share during one open_clip training run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model: nn.Module | None = None
        self.epoch = 0
        self.steps_per_epoch = 0
        self.tb_writer = None
        self.loss_calls = 0

    # -- model
    def create_model_and_transforms(self, original, model_name, pretrained=None, **kwargs):
        args = self.args
        if self.model is not None or args.loss != "sigrel":  # distillation teacher, or not sigrel
            out = original(model_name, pretrained, **kwargs)
            self.model = self.model or out[0]
            return out
        t0, b0 = args.sigrel_init_logit_scale, args.sigrel_init_rel_bias
        kwargs.update(init_logit_scale=math.log(t0), init_logit_bias=-t0 * b0)
        with _record_checkpoint_keys() as seen:
            model, *transforms = original(model_name, pretrained, **kwargs)
        loaded = bool(seen)
        had_bias = any("logit_bias" in keys for keys in seen)
        explicit = args.sigrel_explicit_init
        enable_rel_bias(
            model,
            rel_bias=b0 if (not loaded or explicit["rel_bias"] or not had_bias) else None,
            logit_scale=t0 if (not loaded or explicit["logit_scale"]) else None,
            fixed_rel_bias=args.sigrel_fixed_rel_bias,
            fixed_logit_scale=args.sigrel_fixed_logit_scale,
        )
        v = model.sigrel_values
        logging.info(
            f"sigrel: t = {v['logit_scale']:.4f}, b_rel = {v['rel_bias']:.4f} (logit_bias = {v['logit_bias']:.4f})"
            + (" from the pretrained checkpoint" if loaded and had_bias else "")
            + (", b_rel fixed" if args.sigrel_fixed_rel_bias else "")
            + (", t fixed" if args.sigrel_fixed_logit_scale else "")
        )
        self.model = model
        return (model, *transforms)

    # -- loss
    def create_loss(self, original, args):
        if args.loss == "sigrel":
            loss = SigRelLoss(
                rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl,
                normalize=args.sigrel_normalize, chunk_size=args.sigrel_chunk_size,
            )
        else:
            loss = original(args)
        return LossMonitor(loss, self)

    def train_one_epoch(self, original, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None):
        self.epoch, self.tb_writer, self.loss_calls = epoch, tb_writer, 0
        self.steps_per_epoch = data["train"].dataloader.num_batches // args.accum_freq
        return original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer)

    @property
    def step_in_epoch(self) -> int:
        """Index of the optimizer step in progress (open_clip calls the loss accum_freq times a step)."""
        return max(self.loss_calls - 1, 0) // self.args.accum_freq

    # -- values for logs
    def bias_values(self) -> dict[str, float]:
        """t, b_rel and logit_bias of the model being trained (b_rel = -logit_bias / t for any bias)."""
        model = self.model
        if model is None:
            return {}
        if has_rel_bias(model):
            return model.sigrel_values
        with torch.no_grad():
            t = float(model.logit_scale.detach().float().exp().mean())
            bias = getattr(model, "logit_bias", None)
            if bias is None:
                return {"logit_scale": t}
            lb = float(bias.detach().float().mean())
        return {"logit_scale": t, "rel_bias": -lb / t, "logit_bias": lb}

    def get_clip_metrics(self, original, image_features, text_features, logit_scale):
        metrics = original(image_features=image_features, text_features=text_features, logit_scale=logit_scale)
        if self.args.sigrel_no_geometry:
            return metrics
        from open_clip_sigrel.geometry import geometry_metrics

        values = self.bias_values()
        geometry = geometry_metrics(
            image_features, text_features, logit_scale=float(logit_scale), logit_bias=values.get("logit_bias")
        )
        for key, value in geometry.items():
            metrics.setdefault(key, value)
        return metrics

    def on_train_log(self, record: logging.LogRecord) -> None:
        """Called for open_clip's 'Train Epoch' line: adds b_rel / logit_bias and train/ scalars."""
        values = self.bias_values()
        if "rel_bias" in values:
            record.msg = f"{record.msg} Rel Bias: {values['rel_bias']:.4f} Logit Bias: {values['logit_bias']:.4f}"
        scalars = {f"train/{k}": v for k, v in values.items() if k != "logit_scale"}
        batch = getattr(self, "last_batch", None)
        if batch is not None:
            scalars.update({f"train/batch_{k}": v for k, v in batch_constellation(*batch).items()})
        step = self.steps_per_epoch * self.epoch + self.step_in_epoch
        if self.tb_writer is not None:
            for name, value in scalars.items():
                self.tb_writer.add_scalar(name, value, step)
        if getattr(self.args, "wandb", False):
            import wandb

            wandb.log(scalars, step=step)


@torch.no_grad()
def batch_constellation(image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: int = 1024
                        ) -> dict[str, float]:
    """Worst-case and mean halved margin / relative bias of one local batch (the paper's m*, b*_rel).

    Row blocks keep memory at chunk_size x B; the full metric set is open_clip_sigrel.geometry's.
    """
    x = torch.nn.functional.normalize(image_features.float(), dim=-1)
    y = torch.nn.functional.normalize(text_features.float(), dim=-1)
    n = x.shape[0]
    if n < 2:
        return {}
    pos = (x * y).sum(-1)
    neg_max, neg_sum = -math.inf, 0.0
    for lo in range(0, n, chunk_size):
        s = x[lo:lo + chunk_size] @ y.T
        rows = torch.arange(s.shape[0], device=s.device)
        diag = s[rows, rows + lo].clone()
        neg_sum += float(s.sum() - diag.sum())
        s[rows, rows + lo] = -math.inf
        neg_max = max(neg_max, float(s.max()))
    pos_min, pos_mean, neg_mean = float(pos.min()), float(pos.mean()), neg_sum / (n * (n - 1))
    return {
        "margin_worst": (pos_min - neg_max) / 2, "rel_bias_worst": (pos_min + neg_max) / 2,
        "margin_mean": (pos_mean - neg_mean) / 2, "rel_bias_mean": (pos_mean + neg_mean) / 2,
    }


class LossMonitor(nn.Module):
    """Wraps the run's loss: counts calls, keeps the last local batch for logs, stops on NaN/Inf."""

    def __init__(self, loss: nn.Module, run: SigrelRun):
        super().__init__()
        self.loss = loss
        self._run = [run]  # a list keeps the run out of the module tree

    def forward(self, **kwargs):
        run = self._run[0]
        run.loss_calls += 1
        out = self.loss(**kwargs)
        total = sum(out.values()) if isinstance(out, dict) else out
        if not bool(torch.isfinite(total.detach()).all()):
            values = ", ".join(f"{k} = {v:.6g}" for k, v in run.bias_values().items())
            raise FloatingPointError(
                f"non-finite loss {total.detach().float().tolist()} at epoch {run.epoch}, step "
                f"{run.steps_per_epoch * run.epoch + run.step_in_epoch} (batch {run.step_in_epoch} of the epoch): "
                f"{values}. Lower the learning rate, use --precision amp_bf16 or fp32, or clip gradients "
                "(--grad-clip-norm)."
            )
        run.last_batch = (kwargs["image_features"].detach(), kwargs["text_features"].detach())
        return out


class _TrainLogHook(logging.Filter):
    """Sees open_clip's 'Train Epoch: ...' log record before it is written."""

    def __init__(self, holder: dict):
        super().__init__()
        self.holder = holder

    def filter(self, record: logging.LogRecord) -> bool:
        run = self.holder.get("run")
        if run is not None and isinstance(record.msg, str) and record.msg.startswith("Train Epoch:"):
            run.on_train_log(record)
        return True


@contextlib.contextmanager
def _record_checkpoint_keys() -> Iterator[list]:
    """Records the keys of every state dict open_clip's factory loads (did the weights have a bias?)."""
    import open_clip.factory as factory

    seen: list = []
    original = factory.load_state_dict

    def load_state_dict(*a, **kw):
        sd = original(*a, **kw)
        seen.append(set(sd))
        return sd

    factory.load_state_dict = load_state_dict
    try:
        yield seen
    finally:
        factory.load_state_dict = original


class _CpuSafeDDP(torch.nn.parallel.DistributedDataParallel):
    """open_clip 3.3.0 passes device_ids=[cpu device], which DDP rejects; CPU modules take none."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def _pt_load_weights_only(file_path, map_location=None):
    import fsspec

    with fsspec.open(file_path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


class _ClampView:
    """What open_clip's per-step ``unwrap_model(model).logit_scale.clamp_(0, ln 100)`` sees."""

    def __init__(self, model: nn.Module, max_log_t: float):
        self._model, self._max = model, max_log_t

    def __getattr__(self, name):
        if name == "logit_scale":
            return _ClampedScale(self._model.logit_scale, self._max)
        return getattr(self._model, name)


class _ClampedScale:
    def __init__(self, param: torch.Tensor, max_log_t: float):
        self._param, self._max = param, max_log_t

    def clamp_(self, min=None, max=None):  # noqa: A002 - mirrors Tensor.clamp_
        return self._param.clamp_(min, None if math.isinf(self._max) else self._max)

    def __getattr__(self, name):
        return getattr(self._param, name)


@contextlib.contextmanager
def _swapped(obj, name: str, value) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def main(argv: list[str] | None = None) -> int:
    """Runs open_clip_train.main.main with the plugin's hooks; returns its exit status."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m open_clip_sigrel.train -- --logs ...` (torchrun's own --logs-specs)
        argv = argv[1:]
    holder: dict = {}

    def parse(a):
        holder["run"] = SigrelRun(parse_args(a, stock_parse_args=stock_parse))
        return holder["run"].args

    def hook(name, original):
        return lambda *a, **kw: getattr(holder["run"], name)(original, *a, **kw)

    stock_parse = oc_main.parse_args
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        enter(_swapped(oc_main, "parse_args", parse))
        for name in ("create_model_and_transforms", "create_loss", "train_one_epoch"):
            enter(_swapped(oc_main, name, hook(name, getattr(oc_main, name))))
        enter(_swapped(oc_train, "get_clip_metrics", hook("get_clip_metrics", oc_train.get_clip_metrics)))
        enter(_swapped(oc_main, "pt_load", _pt_load_weights_only))
        enter(_swapped(torch.nn.parallel, "DistributedDataParallel", _CpuSafeDDP))
        original_unwrap = oc_train.unwrap_model

        def unwrap_model(model):
            inner = original_unwrap(model)
            t_max = holder["run"].args.sigrel_max_logit_scale
            return inner if t_max is None else _ClampView(inner, math.log(t_max))

        enter(_swapped(oc_train, "unwrap_model", unwrap_model))
        log_hook = _TrainLogHook(holder)
        logging.getLogger().addFilter(log_hook)
        stack.callback(logging.getLogger().removeFilter, log_hook)
        status = oc_main.main(argv)
    return int(status or 0)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
