"""The one place that knows which open_clip releases the training entry supports.

Only ``open-clip-sigrel-train`` (open_clip_sigrel.hosts) checks this: the loss, the geometry
metrics and the bounds import and work whatever open_clip is installed. Which adapter runs is
decided by probing open_clip_train (open_clip_sigrel.hosts.select), the range here is what is tested:
2.30.0 (where --loss-dist-impl appeared) through 3.x by name swaps, 4.x through the task API.
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

MIN_VERSION = (2, 30)
MAX_VERSION_EXCLUSIVE = (5,)
SUPPORTED = "open_clip_torch>=2.30,<5"


def _parse(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])


def check_open_clip_version(installed: str | None = None) -> str:
    """Returns the installed open_clip_torch version; ImportError if it is outside the tested range."""
    if installed is None:
        try:
            installed = version("open_clip_torch")
        except PackageNotFoundError as e:
            raise ImportError(f"open-clip-sigrel-train needs {SUPPORTED}; open_clip_torch is not installed") from e
    parsed = _parse(installed)
    if not (MIN_VERSION <= parsed[: len(MIN_VERSION)] and parsed[:1] < MAX_VERSION_EXCLUSIVE):
        raise ImportError(
            f"the training entry supports {SUPPORTED}; found open_clip_torch {installed}. "
            "Install a supported release, e.g. pip install 'open_clip_torch==3.3.0'."
        )
    return installed
