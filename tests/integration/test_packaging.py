"""Packaging: sdist + wheel with the model configs, console scripts from a fresh venv, pip check.

Offline: ``python -m build --no-isolation`` uses the installed setuptools / wheel / build (the
``test`` extra), and the wheel goes into a ``--system-site-packages`` venv with ``--no-deps
--no-index``, so torch and open_clip are reused. The build runs on a copy of the checkout, so the
working tree (egg-info, build/) is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import open_clip_sigrel

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (REPO / "open_clip_sigrel" / "configs").glob("*.json"))
SCRIPTS = {
    "open-clip-sigrel": ["make-data", "eval", "synth", "bounds", "demo"],
    "open-clip-sigrel-train": ["--loss", "--sigrel-init-rel-bias", "--train-data"],
}


def _source_copy(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files of the checkout (what a clean clone would build)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pkg")
    src = _source_copy(root / "src")
    out = root / "dist"
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                             "--outdir", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    version = open_clip_sigrel.__version__
    found = {"sdist": out / f"open_clip_sigrel-{version}.tar.gz",
             "wheel": out / f"open_clip_sigrel-{version}-py3-none-any.whl"}
    assert all(p.is_file() for p in found.values()), sorted(p.name for p in out.iterdir())
    return found


def test_sdist_has_sources_and_model_configs(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"open_clip_sigrel/configs/{c}" for c in CONFIGS} <= names
    assert {"setup.cfg", "pyproject.toml", "README.md", "open_clip_sigrel/__init__.py",
            "open_clip_sigrel/hosts/plugin.py", "open_clip_sigrel/cli/train.py"} <= names
    assert {"benchmarks/bench.py", "benchmarks/cuda_check.sh"} <= names  # beside the package, in the source


def test_wheel_has_package_configs_and_entry_points(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        metadata = whl.read(f"{info}/METADATA").decode()
    assert {f"open_clip_sigrel/configs/{c}" for c in CONFIGS} <= names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "open_clip_sigrel").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every module of every sub-package ships
    assert {n.split("/")[0] for n in names} == {"open_clip_sigrel", info}  # no tests/, patches/ in the wheel
    assert not [n for n in names if "bench" in n.rsplit("/", 1)[-1]]  # nor the benchmarks, anywhere
    assert "open-clip-sigrel = open_clip_sigrel.cli:main" in entry_points
    assert "open-clip-sigrel-train = open_clip_sigrel.cli.train:cli" in entry_points
    assert "[open_clip.losses]\nsigrel = open_clip_sigrel.hosts.plugin:sigrel" in entry_points
    assert "Requires-Dist: open_clip_torch<5,>=2.30" in metadata
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    core = sorted(r.split(";")[0].split("<")[0].split(">")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["numpy", "open_clip_torch", "torch"]  # everything else is an extra
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert {"train", "plots", "research", "data", "all", "test"} <= extras


def test_wheel_installs_in_fresh_venv_and_console_scripts_print_help(dists, tmp_path):
    venv = tmp_path / "venv"
    # --without-pip: the system pip installs into the venv (no ensurepip copy, nothing downloaded).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(dists["wheel"])],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run([str(py), "-c", "import open_clip_sigrel, sys; print(open_clip_sigrel.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout  # the wheel's copy
    for script, expected in SCRIPTS.items():
        exe = venv / "bin" / script
        assert exe.is_file(), sorted(p.name for p in (venv / "bin").iterdir())
        result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith("usage:") and all(word in result.stdout for word in expected), \
            result.stdout[:2000]


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert result.returncode == 0, result.stdout + result.stderr
