"""open_clip 2.30-3.x: the training loop has no seam, so names it looks up are swapped for one run.

open_clip_train.main imports its helpers into its own namespace; these are replaced while
``run`` executes (and restored after):

  parse_args                   the plugin's flags, then open_clip's parser (open_clip_sigrel.cli.train).
  create_model_and_transforms  a sigrel model gets its trainable ``rel_bias`` (open_clip_sigrel.model).
  create_loss                  ``SigRelLoss`` for --loss sigrel, inside the LossMonitor (every loss).
  train_one_epoch              the step clock learns the epoch, the writer and the optimizer.
  train.get_clip_metrics       adds the geometry metrics to every open_clip evaluation.
  train.unwrap_model           only with --sigrel-max-logit-scale: open_clip's fixed clamp of t at 100.
  torch DDP                    no ``device_ids`` on CPU (stock 3.x passes them and fails under gloo).
  pt_load                      checkpoints are read with weights_only=True.

The loss dict of 3.x is summed whole, so telemetry goes to its TensorBoard writer / W&B directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from open_clip_sigrel.hosts.common import LossMonitor, SigrelRun, run_open_clip_main

NAME = "open_clip 3.x (name swaps)"


def probe(oc_main) -> bool:
    return all(hasattr(oc_main, n) for n in ("create_loss", "train_one_epoch", "pt_load", "create_model_and_transforms"))


def is_log_step(i_accum: int, steps_per_epoch: int, args) -> bool:
    """open_clip 3.x logs (console, TensorBoard, W&B) on these steps."""
    return i_accum % args.log_every_n_steps == 0 or i_accum + 1 == steps_per_epoch


def create_loss(run: SigrelRun, original, args) -> nn.Module:
    loss = run.sigrel_loss() if args.loss == "sigrel" else original(args)
    return LossMonitor(loss, run, is_log_step, report="writer")


def train_one_epoch(run: SigrelRun, original, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model,
                    args, tb_writer=None):
    run.start_epoch(epoch, data["train"].dataloader.num_batches, tb_writer=tb_writer, optimizer=optimizer)
    return original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer)


def _pt_load_weights_only(file_path, map_location=None):
    import fsspec

    with fsspec.open(file_path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


class ClampView:
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


def unwrap_model(run: SigrelRun, original, model):
    inner = original(model)
    t_max = run.args.sigrel_max_logit_scale
    return inner if t_max is None else ClampView(inner, math.log(t_max))


def run(argv: list[str], parse) -> int:
    """open_clip_train.main.main(argv) with the plugin's hooks; ``parse(argv, stock_parse_args)`` -> args."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train

    return run_open_clip_main(
        argv, parse,
        run_hooks=[(oc_main, "create_loss", create_loss), (oc_main, "train_one_epoch", train_one_epoch),
                   (oc_train, "unwrap_model", unwrap_model)],
        plain_swaps=[(oc_main, "pt_load", _pt_load_weights_only)],
    )
