"""The ``sigrel`` loss plugin for stock open_clip (the ``open_clip.losses`` entry-point group).

With ``patches/open_clip-3.3.0-loss-registry.patch`` applied, open_clip discovers this object through

    [options.entry_points]
    open_clip.losses =
        sigrel = open_clip_sigrel.registry:sigrel

and ``python -m open_clip_train.main --loss sigrel ...`` trains exactly as
``open-clip-sigrel-train --loss sigrel ...`` does: the hooks below call the plugin's own
flags, checks, model extension and loss (``open_clip_sigrel.train``); nothing is re-implemented.

Hook protocol (see ``open_clip.factory.get_loss_plugin`` in the patch):

  add_args(parser)             the ``--sigrel-*`` flags; also registers the shipped model configs.
  check_args(args)             ``train.resolve_args``: validation, config-block defaults; sets
                               ``args.max_logit_scale`` (the patched clamp of t after each step).
  create_model_and_transforms  ``SigrelRun.create_model_and_transforms``: SigLIP-style init and the
                               trainable ``rel_bias`` (``enable_rel_bias``) before the optimizer exists.
  create_loss(args)            ``open_clip3.create_loss``: ``SigRelLoss`` in the LossMonitor (guard, telemetry).

The geometry metrics and the extra log fields stay with ``open-clip-sigrel-train``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from open_clip_sigrel import train as _train
from open_clip_sigrel.hosts import open_clip3
from open_clip_sigrel.hosts.common import SigrelRun
from open_clip_sigrel.model_config import register_shipped_configs

NAME = "sigrel"


class SigrelLossPlugin:
    """open_clip loss plugin object for ``--loss sigrel``; one run per process at a time."""

    name = NAME

    def __init__(self) -> None:
        self._run: SigrelRun | None = None

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """Adds the plugin's ``--sigrel-*`` flags (all of them but its own ``--loss``) to open_clip's parser."""
        register_shipped_configs()  # sigrel-tiny, ViT-B-16-sigrel
        _train.add_sigrel_arguments(parser.add_argument_group("open_clip_sigrel (--loss sigrel)"))

    def check_args(self, args: argparse.Namespace) -> None:
        """The plugin's own checks and defaults; the run's state starts here."""
        _train.resolve_args(args)
        args.max_logit_scale = args.sigrel_max_logit_scale
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
        """``SigRelLoss`` for args parsed with this plugin's flags (open_clip_train's parse_args)."""
        run = self._own_run(args) or SigrelRun(args)
        return open_clip3.create_loss(run, _no_stock_loss, args)


def _no_stock_loss(args: argparse.Namespace) -> nn.Module:
    raise AssertionError("open_clip3.create_loss builds SigRelLoss itself for --loss sigrel")


sigrel = SigrelLossPlugin()
