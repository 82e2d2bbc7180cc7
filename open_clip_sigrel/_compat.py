"""The one place that knows which open_clip releases the plugin supports.

The seams used (open_clip_train.main's imported names, open_clip_train.train.get_clip_metrics /
unwrap_model, open_clip.loss's neighbour-exchange helpers, SigLipLoss(dist_impl=...)) are the same
from 2.30.0 (where --loss-dist-impl appeared) through 3.x.
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

MIN_VERSION = (2, 30)
MAX_VERSION_EXCLUSIVE = (4,)
SUPPORTED = "open_clip_torch>=2.30,<4"


def _parse(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])


def check_open_clip_version(installed: str | None = None) -> str:
    """Returns the installed open_clip_torch version; ImportError if it is outside the tested range."""
    if installed is None:
        try:
            installed = version("open_clip_torch")
        except PackageNotFoundError as e:
            raise ImportError(f"open_clip_sigrel needs {SUPPORTED}; it is not installed") from e
    parsed = _parse(installed)
    if not (MIN_VERSION <= parsed[: len(MIN_VERSION)] and parsed[:1] < MAX_VERSION_EXCLUSIVE):
        raise ImportError(
            f"open_clip_sigrel supports {SUPPORTED}; found open_clip_torch {installed}. "
            "Install a supported release, e.g. pip install 'open_clip_torch==3.3.0'."
        )
    return installed
