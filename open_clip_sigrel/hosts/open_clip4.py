"""open_clip 4.x: --loss sigrel through the task seam.

open_clip_train.main (4.x) builds the model, then ``create_task(args, model, ...)``, then wraps the
task's module (DDP or FSDP2) and builds the optimizer from it. The plugin provides:

  create_task                  --loss sigrel: ``SigRelTask``, a SigLIPTask whose loss is SigRelLoss
                               (inside the LossMonitor) and whose ``clamp_logit_scale`` honours
                               --sigrel-max-logit-scale. Other losses: open_clip's own task (a CLIP /
                               SigLIP task's loss inside the LossMonitor, for the same telemetry).
  create_model_and_transforms  a sigrel model gets its trainable ``rel_bias`` before the task exists.
  train_one_epoch              the step clock learns the epoch and the optimizer (TrainState).
  train.get_clip_metrics       adds the geometry metrics to every open_clip evaluation.
  torch DDP                    no ``device_ids`` on CPU (4.x passes them and fails under gloo).

Telemetry rides on the task's loss dict: 4.x sums only its ``*_loss`` keys and logs every other
key as a train/ scalar (all-reduced over ranks) at its own metric steps.
"""
from __future__ import annotations

import math

from open_clip_sigrel.hosts.common import LossMonitor, SigrelRun, run_open_clip_main
from open_clip_sigrel.hosts.options import SigrelOptionError

NAME = "open_clip 4.x (task API)"


def probe(oc_main) -> bool:
    return all(hasattr(oc_main, n) for n in ("create_task", "train_one_epoch", "create_model_and_transforms"))


def is_log_step(i_accum: int, steps_per_epoch: int, args) -> bool:
    """open_clip 4.x logs train/ scalars (and reads the loss dict) on these steps."""
    console = i_accum % args.log_every_n_steps == 0 or i_accum + 1 == steps_per_epoch
    every = max(1, getattr(args, "log_metric_every_n_steps", args.log_every_n_steps))
    return console or i_accum % every == 0


def _sigrel_task_class():
    from open_clip.task import SigLIPTask

    class SigRelTask(SigLIPTask):
        """SigLIP task with the relative-bias loss; t's upper clamp is --sigrel-max-logit-scale."""

        def __init__(self, model, *, loss, max_logit_scale: float | None = None, **kwargs):
            super().__init__(model, loss=loss, **kwargs)
            self.max_logit_scale = max_logit_scale

        def clamp_logit_scale(self, max_val: float = math.log(100)):
            if self.max_logit_scale is not None:
                max_val = math.log(self.max_logit_scale)  # inf lifts the clamp
            return super().clamp_logit_scale(max_val)

    return SigRelTask


def create_task(run: SigrelRun, original, args, model, *a, **kw):
    if getattr(args, "loss", None) != "sigrel":
        task = original(args, model, *a, **kw)
        if type(task).__name__ in ("CLIPTask", "SigLIPTask"):  # the same telemetry as a sigrel run
            task.loss = LossMonitor(task.loss, run, is_log_step, report="losses")
        if args.sigrel_max_logit_scale is not None:  # a stock task with the user's clamp of t
            stock, max_val = task.clamp_logit_scale, math.log(args.sigrel_max_logit_scale)
            task.clamp_logit_scale = lambda *_, **__: stock(max_val)
        return task
    if not hasattr(model, "visual"):  # e.g. a CLAP (audio-text) model: open_clip gives it a CLAPTask
        raise ValueError(f"--loss sigrel trains image-text models; {type(model).__name__} has no image tower")
    loss = LossMonitor(run.sigrel_loss(), run, is_log_step, report="losses")
    task = _sigrel_task_class()(model, loss=loss, max_logit_scale=args.sigrel_max_logit_scale,
                                rank=args.rank, world_size=args.world_size)
    naflex = kw.get("naflex_data_config", a[1] if len(a) > 1 else None)
    if naflex is not None:
        task.set_naflex_data_config(naflex)
    return task


def train_one_epoch(run: SigrelRun, original, state, data, args, tb_writer=None):
    run.start_epoch(state.epoch, data["train"].dataloader.num_batches, tb_writer=tb_writer,
                    optimizer=state.optimizer)
    return original(state, data, args, tb_writer=tb_writer)


def check_args(args) -> None:
    """4.x features that cannot work with --loss sigrel, refused before any work."""
    if args.loss != "sigrel":
        return
    if getattr(args, "use_naflex", False):
        raise SigrelOptionError("--loss sigrel does not support NaFlex (--use-naflex) yet")
    if "audio" in (args.dataset_type or ""):
        raise SigrelOptionError(f"--loss sigrel trains image-text models; --dataset-type {args.dataset_type} is audio")
    if "genlip" in args.model.lower() or "genlap" in args.model.lower():
        raise SigrelOptionError(f"--loss sigrel needs a contrastive image-text model, not {args.model}")


def run(argv: list[str], parse) -> int:
    """open_clip_train.main.main(argv) with the plugin's seams; ``parse(argv, stock_parse_args)`` -> args."""
    import open_clip_train.main as oc_main

    return run_open_clip_main(
        argv, parse, check_args=check_args,
        run_hooks=[(oc_main, "create_task", create_task), (oc_main, "train_one_epoch", train_one_epoch)],
    )
