"""What the two patch test modules share: a private, patched copy of the installed open_clip."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def site_packages() -> Path:
    """The folder holding the installed ``open_clip`` and ``open_clip_train``."""
    import open_clip
    import open_clip_train

    root = Path(open_clip.__file__).resolve().parents[1]
    assert Path(open_clip_train.__file__).resolve().parents[1] == root
    return root


def run_patch(patch: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("patch")
    assert binary, "the `patch` program is missing (CI: apt-get install -y patch)"
    return subprocess.run([binary, *args, "--batch", "-i", str(patch)], cwd=cwd, capture_output=True, text=True)


def copy_open_clip(dest: Path) -> Path:
    """Copies the installed open_clip and open_clip_train into ``dest`` (the environment stays untouched)."""
    site = site_packages()
    dest.mkdir(parents=True)
    for package in ("open_clip", "open_clip_train"):
        shutil.copytree(site / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def subprocess_env(pythonpath: Path | None) -> dict[str, str]:
    """The environment of a training subprocess: one thread, loopback gloo, the patched copy first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env
