#!/usr/bin/env bash
# The core tests against another torch than the system's (default: the newest on PyPI, torch 2.15.0 with
# its torchvision pair 0.29.2, open_clip_torch 3.3.0), in an ISOLATED virtual env installed the way a
# user's is: everything from the index, no --system-site-packages (nothing of the system's leaks in),
# and pip without this machine's config files (PIP_CONFIG_FILE=/dev/null): they hold constraints that
# cap torch at the system's release, and pip would apply them to the venv too.
#
#   bash .ci/torch_matrix.sh                                # torch 2.15.0, venv in /tmp/venv-torch215
#   TESTS="tests/unit/test_loss.py" bash .ci/torch_matrix.sh
#   TORCH_VERSION=2.14.1 TORCHVISION_VERSION=0.29.1 bash .ci/torch_matrix.sh
#
# The wheels are the CUDA builds (PyPI has no CPU-only torch): ~2.9 GB with their nvidia-* packages.
# Measured here: a new venv takes ~5 min to install (~40 s of it the download), a reused one ~10 s.
# Missing TESTS files are skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.2}"
OPEN_CLIP_VERSION="${OPEN_CLIP_VERSION:-3.3.0}"
VENV="${VENV:-/tmp/venv-torch$(echo "$TORCH_VERSION" | cut -d. -f1-2 | tr -d .)}"  # 2.15.0 -> venv-torch215
TESTS="${TESTS:-tests/unit tests/distributed tests/integration/test_train.py}"
# gloo's default interface may not route to this host; loopback is enough for single-host tests.
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
start=$(date +%s)

[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
py="$VENV/bin/python"
# One resolve: the pinned trio plus this checkout's [test] extra (webdataset<=0.2.86 as open_clip 3.x pins it).
env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q \
  "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" "open_clip_torch==${OPEN_CLIP_VERSION}" \
  -e ".[test]"
installed=$(date +%s)
echo "torch_matrix: venv and install $(( installed - start )) s"

# The venv must run the pinned releases from itself, and this checkout of the plugin.
"$py" - "$TORCH_VERSION" "$TORCHVISION_VERSION" "$OPEN_CLIP_VERSION" "$VENV" "$PWD" <<'PY'
import sys
from importlib.metadata import version
from pathlib import Path

import open_clip
import open_clip_sigrel
import open_clip_train
import torch
import torchvision
import webdataset

want = dict(zip(("torch", "torchvision", "open_clip_torch"), sys.argv[1:4]))
venv, repo = Path(sys.argv[4]).resolve(), Path(sys.argv[5]).resolve()
for module in (torch, torchvision, open_clip, open_clip_train, webdataset):
    assert venv in Path(module.__file__).resolve().parents, f"{module.__name__} from {module.__file__}"
got = {name: version(name) for name in want}
assert got == want, f"{got} in {venv}, expected {want}"
assert repo in Path(open_clip_sigrel.__file__).resolve().parents, open_clip_sigrel.__file__
print("torch_matrix:", ", ".join(f"{k} {v}" for k, v in got.items()) + ",",
      f"webdataset {version('webdataset')}, python {sys.version.split()[0]}, from {venv}")
PY

run=()
for t in $TESTS; do
  if [ -e "${t%%::*}" ]; then run+=("$t"); else echo "torch_matrix: skipping missing $t"; fi
done
if [ ${#run[@]} -eq 0 ]; then
  echo "torch_matrix: none of TESTS exists: $TESTS" >&2
  exit 1
fi
"$py" -m pytest -q -p no:cacheprovider "${run[@]}"
echo "torch_matrix: torch ${TORCH_VERSION}: ${#run[@]} test path(s) passed in $(( $(date +%s) - installed )) s"
