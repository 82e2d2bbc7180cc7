"""Host adapters: how ``open-clip-sigrel-train`` plugs into the installed open_clip_train.

  open_clip3   open_clip 2.30-3.x: names open_clip_train.main / train look up, swapped for one run.
  open_clip4   open_clip 4.x: the task seam (create_task -> SigRelTask, clamp_logit_scale, loss dict).
  common       what both share: run state, model extension, loss monitor, non-finite guard, geometry hook.
  telemetry    sigrel_train.jsonl: written per log step, read by read_telemetry; the batch geometry it carries.
  options      the --sigrel-* flags and their checks (SigrelOptionError).
  plugin       the ``open_clip.losses`` entry-point object the upstream patches call.

The adapter is chosen by probing what the installed ``open_clip_train.main`` offers (4.x has
``create_task``, 3.x ``create_loss``), not by its version string. Nothing outside this package
touches open_clip_train's training internals (checkpoint evaluation uses its public CsvDataset and
get_autocast, which every supported release has).
"""
from __future__ import annotations

from types import ModuleType


def select(oc_main: ModuleType | None = None) -> ModuleType:
    """The adapter module for the installed open_clip_train (or the given ``open_clip_train.main``);
    ImportError naming the supported range."""
    from open_clip_sigrel._compat import SUPPORTED, check_open_clip_version

    installed = check_open_clip_version()
    if oc_main is None:
        try:
            import open_clip_train.main as oc_main
        except ModuleNotFoundError as e:  # open_clip_train's data libraries are the [train] extra
            raise ImportError(
                f"open_clip_train cannot be imported ({e.name} is missing): install the training extra, "
                "pip install 'open_clip_sigrel[train]'"
            ) from e

    from open_clip_sigrel.hosts import open_clip3, open_clip4

    for adapter in (open_clip4, open_clip3):
        if adapter.probe(oc_main):
            return adapter
    raise ImportError(
        f"open_clip_torch {installed}: open_clip_train.main offers neither create_task (4.x) nor create_loss "
        f"(3.x); open-clip-sigrel-train supports {SUPPORTED}"
    )
