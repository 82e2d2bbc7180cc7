#!/usr/bin/env bash
# The core tests against another open_clip_torch than the system's (default: the OLDEST supported,
# 2.30.0), in a lean virtual env that reuses the installed torch / torchvision / timm / webdataset
# (--system-site-packages) and shadows the system's open_clip with that release (--no-deps).
#
#   bash .ci/version_matrix.sh                         # default tests, venv in /tmp/venv-oc230
#   TESTS="tests/unit/test_loss.py" bash .ci/version_matrix.sh
#   OPEN_CLIP_VERSION=2.31.0 VENV=/tmp/venv-oc231 bash .ci/version_matrix.sh
#   OPEN_CLIP_WHEEL=../shared/vendor/open_clip_torch-4.2.0.dev0-py3-none-any.whl bash .ci/version_matrix.sh
#                                                      # a wheel (open_clip main); its version from the name
#
# Test files named in TESTS that do not exist are skipped (with a note); none left is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
OPEN_CLIP_WHEEL="${OPEN_CLIP_WHEEL:-}"
if [ -n "$OPEN_CLIP_WHEEL" ]; then
  [ -f "$OPEN_CLIP_WHEEL" ] || { echo "version_matrix: no wheel at $OPEN_CLIP_WHEEL" >&2; exit 1; }
  OPEN_CLIP_VERSION="$(basename "$OPEN_CLIP_WHEEL" | cut -d- -f2)"  # open_clip_torch-<version>-py3-...
fi
OPEN_CLIP_VERSION="${OPEN_CLIP_VERSION:-2.30.0}"
VENV="${VENV:-/tmp/venv-oc$(echo "$OPEN_CLIP_VERSION" | cut -d. -f1-2 | tr -d .)}"  # 2.30.0 -> venv-oc230, 4.2.0.dev0 -> venv-oc42
TESTS="${TESTS:-tests/unit tests/distributed tests/integration/test_train.py}"
# gloo's default interface may not route to this host; loopback is enough for single-host tests.
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  # --without-pip: the system pip and setuptools serve the venv (ensurepip would bring an older setuptools)
  python -m venv --system-site-packages --without-pip "$VENV"
fi
py="$VENV/bin/python"
"$py" -m pip install -q --no-deps "${OPEN_CLIP_WHEEL:-open_clip_torch==${OPEN_CLIP_VERSION}}"
"$py" -m pip install -q --no-deps --no-build-isolation -e .

# The venv must see its own open_clip (not the system's) and this checkout of the plugin.
"$py" - "$OPEN_CLIP_VERSION" "$VENV" "$PWD" <<'PY'
import sys
from importlib.metadata import version
from pathlib import Path

import open_clip
import open_clip_sigrel
import open_clip_train

want, venv, repo = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()
got = version("open_clip_torch")
for module in (open_clip, open_clip_train):
    assert venv in Path(module.__file__).resolve().parents, f"{module.__name__} from {module.__file__}"
assert got == want, f"open_clip_torch {got} in {venv}, expected {want}"
assert repo in Path(open_clip_sigrel.__file__).resolve().parents, open_clip_sigrel.__file__
print(f"open_clip_torch {got} from {Path(open_clip.__file__).parent}; plugin from {repo}")
PY

run=()
for t in $TESTS; do
  if [ -e "${t%%::*}" ]; then run+=("$t"); else echo "version_matrix: skipping missing $t"; fi
done
if [ ${#run[@]} -eq 0 ]; then
  echo "version_matrix: none of TESTS exists: $TESTS" >&2
  exit 1
fi
"$py" -m pytest -q -p no:cacheprovider "${run[@]}"
echo "version_matrix: open_clip_torch ${OPEN_CLIP_VERSION}: ${#run[@]} test file(s) passed in $(( $(date +%s) - start )) s"
