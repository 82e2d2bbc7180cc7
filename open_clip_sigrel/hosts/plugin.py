"""The ``sigrel`` loss plugin for stock open_clip (the ``open_clip.losses`` entry-point group).

One object serves both open_clip patches in ``patches/``; open_clip discovers it through

    [options.entry_points]
    open_clip.losses =
        sigrel = open_clip_sigrel.hosts.plugin:sigrel

and, with either patch applied, ``python -m open_clip_train.main --loss sigrel ...`` trains exactly as
``open-clip-sigrel-train --loss sigrel ...`` does: the hooks below call the plugin's own flags,
checks, model extension, loss and task (``open_clip_sigrel.cli.train``, ``open_clip_sigrel.hosts``);
nothing is re-implemented.

Hooks both patches call (``open_clip_train.params.parse_args`` and ``open_clip_train.main``):

  add_args(parser)             the ``--sigrel-*`` flags; also registers the shipped model configs.
  check_args(args)             ``hosts.options.resolve_args``: validation (SigrelOptionError, a ValueError:
                               the patched parse_args turns it into parser.error), config-block defaults; on 4.x also
                               ``hosts.open_clip4.check_args`` (no NaFlex, no generative models); on 3.x
                               it sets ``args.max_logit_scale`` (the 3.3.0 patch's clamp of t).
  create_model_and_transforms(args, create_fn, model_name, pretrained, **kwargs)
                               ``SigrelRun.create_model_and_transforms``: SigLIP-style init and the
                               trainable ``rel_bias`` (``enable_rel_bias``) before the optimizer exists.

Then each patch builds the loss its own way:

  create_loss(args)            open_clip 3.3.0 (``patches/open_clip-3.3.0-loss-registry.patch``,
                               ``open_clip.factory.create_loss``): ``hosts.open_clip3.create_loss``,
                               ``SigRelLoss`` in the LossMonitor (guard, telemetry).
  create_task(args, model, dist_model=None, naflex_data_config=None)
                               open_clip 4.x (``patches/open_clip-main-89fb801-task-registry.patch``,
                               ``open_clip.factory.create_task``): ``hosts.open_clip4.create_task``,
                               ``SigRelTask`` (a SigLIPTask: ``SigRelLoss`` in the LossMonitor, its
                               ``clamp_logit_scale`` honours ``--sigrel-max-logit-scale``).

The run's state (``hosts.common.SigrelRun``) starts in ``check_args``; the hooks after it act on the
args that ``check_args`` saw. When ``open-clip-sigrel-train`` drives a run on a patched open_clip,
its own seams already wrap open_clip's functions, so ``create_model_and_transforms`` passes
through (the patched ``create_task`` / ``create_loss`` are then not reached for ``--loss sigrel``).

The geometry metrics of evaluation, and the epoch / learning rate in the telemetry
(``<logs>/<name>/sigrel_train.jsonl``), need the host's epoch loop and stay with
``open-clip-sigrel-train``; through the patches the telemetry's step counts the optimizer steps of
the process (from 0, also after ``--resume``) and its ``epoch`` stays 0.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from open_clip_sigrel.configs import register_shipped_configs
from open_clip_sigrel.hosts import open_clip3, open_clip4
from open_clip_sigrel.hosts.common import SigrelRun
from open_clip_sigrel.hosts.options import add_sigrel_arguments, resolve_args

NAME = "sigrel"


def _has_task_api() -> bool:
    """open_clip 4.x builds model + loss as a task (``open_clip.factory.create_task``)."""
    import open_clip.factory

    return hasattr(open_clip.factory, "create_task")


class SigrelLossPlugin:
    """open_clip loss plugin object for ``--loss sigrel``; one run per process at a time."""

    name = NAME

    def __init__(self) -> None:
        self._run: SigrelRun | None = None

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """Adds the plugin's ``--sigrel-*`` flags (all of them but its own ``--loss``) to open_clip's parser."""
        register_shipped_configs()  # sigrel-tiny, ViT-B-16-sigrel
        add_sigrel_arguments(parser.add_argument_group("open_clip_sigrel (--loss sigrel)"))

    def check_args(self, args: argparse.Namespace) -> None:
        """The plugin's own checks and defaults; the run's state starts here."""
        resolve_args(args)  # SigrelOptionError (a ValueError): the patched parse_args makes it parser.error
        if _has_task_api():
            open_clip4.check_args(args)  # SigRelTask clamps t itself
        if not _has_task_api():
            args.max_logit_scale = args.sigrel_max_logit_scale  # read by the 3.3.0 patch's clamp
        self._run = SigrelRun(args)

    def _own_run(self, args: argparse.Namespace) -> SigrelRun | None:
        """The run parsed by ``check_args`` — None when ``open-clip-sigrel-train`` drives the run
        itself (its hooks already wrap open_clip's functions; applying them twice would fail)."""
        run = self._run
        return run if run is not None and run.args is args else None

    def create_model_and_transforms(
        self, args: argparse.Namespace, create_fn: Callable[..., tuple], model_name: str,
        pretrained: str | None = None, **kwargs: Any,
    ) -> tuple:
        run = self._own_run(args)
        if run is None:
            return create_fn(model_name, pretrained, **kwargs)
        return run.create_model_and_transforms(create_fn, model_name, pretrained, **kwargs)

    def create_loss(self, args: argparse.Namespace) -> nn.Module:
        """open_clip 3.3.0 patch: ``SigRelLoss`` for args parsed with this plugin's flags."""
        run = self._own_run(args) or SigrelRun(args)
        return open_clip3.create_loss(run, _no_stock_loss, args)

    def create_task(self, args: argparse.Namespace, model: nn.Module, **kwargs: Any) -> nn.Module:
        """open_clip 4.x patch: the ``SigRelTask`` (a TrainingTask) for args parsed with this plugin's
        flags; ``kwargs`` are ``create_task``'s (``dist_model``, ``naflex_data_config``)."""
        run = self._own_run(args) or SigrelRun(args)
        if run.model is None:  # the run's reads of t and b_rel (telemetry) come from this model
            run.model = model
        return open_clip4.create_task(run, _no_stock_task, args, model, **kwargs)


def _no_stock_loss(args: argparse.Namespace) -> nn.Module:
    raise AssertionError("open_clip3.create_loss builds SigRelLoss itself for --loss sigrel")


def _no_stock_task(args: argparse.Namespace, model: nn.Module, *a: Any, **kw: Any) -> nn.Module:
    raise ValueError(f"the sigrel plugin builds tasks for --loss sigrel only, not --loss {args.loss}")


sigrel = SigrelLossPlugin()
