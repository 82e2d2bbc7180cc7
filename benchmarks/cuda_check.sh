#!/usr/bin/env bash
# GPU readiness check of open_clip_sigrel: everything GPU-specific, checked and measured in one command.
#
#   bash benchmarks/cuda_check.sh                 # on a CUDA machine, from anywhere
#   OUT=/some/dir bash benchmarks/cuda_check.sh   # results there (default: ./cuda_check_out, from the
#                                                 # current directory; ignored by git inside the checkout)
#
# Steps (each logged to $OUT/logs/<step>.log; a failed step is recorded and the later steps still run):
#   environment   torch / CUDA / GPU / package versions, where open_clip_sigrel is imported from, nvidia-smi
#   pytest_cuda   python -m pytest -q -rs tests/integration/test_cuda.py: SigRelLoss vs open_clip's SigLipLoss on the GPU
#                 (fp32 and bf16 values and gradients), peak memory at B = 16384, a short amp_bf16 training run;
#                 output in $OUT/pytest_cuda.txt. Fails if any of its tests is skipped.
#   bench_loss_fp32, bench_loss_bf16
#                 python benchmarks/bench.py loss --device cuda --batch $BATCHES --dim 768 --dtype fp32|bf16 --json
#                 --output $OUT/bench_loss_<dtype>.json, then a summary that fails if a sigrel measurement
#                 failed, if another implementation failed for any reason but running out of memory, or if
#                 sigrel's peak extra memory is not below half of SigLipLoss's (not checked in the dry run)
#   bench_train   python benchmarks/bench.py train --device cuda --precision amp_bf16 --json
#                 --output $OUT/bench_train.json (the runs' open_clip logs in $OUT/logs/bench_train_runs)
# Exit status: 0 if every step passed, 1 if any failed (listed at the end and in $OUT/summary.txt),
# 2 if no CUDA device is visible (only the environment step runs then).
#
# Settings (environment variables): OUT, PYTHON (default: python3, else python), BATCHES (default
# 16384,32768,65536), BENCH_TRAIN_STEPS (default 30), STEP_TIMEOUT (seconds per command, 0 = none; default 0),
# CUDA_CHECK_DRY_RUN=1 (run every step on CPU at tiny sizes: checks this script, measures nothing).
# Expected to take a few minutes on an H200 (not yet measured); each bench measurement is a fresh process.
#
# This script installs nothing. Carrying the project to a GPU machine without internet access:
#   1. On a machine with pip access, fetch the pure-Python wheels the GPU machine lacks (torch, timm,
#      numpy, pandas, scikit-learn, ... are usually there; `python3 -m pip show NAME` there tells):
#        python3 -m pip download --no-deps --only-binary=:all: -d wheels \
#            open_clip_torch==3.3.0 webdataset==0.2.86 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.7.0
#   2. Copy the repository checkout and wheels/ over, then on the GPU machine, in the checkout:
#        python3 -m pip install --no-index --no-deps wheels/*.whl
#        python3 -m pip install --no-deps --no-build-isolation -e .   # offline: no build isolation
#      (Where installing is not allowed: python3 -m pip install --no-index --no-deps --target /tmp/site
#      wheels/*.whl; export PYTHONPATH=/tmp/site. This script puts the checkout itself first on PYTHONPATH,
#      so open_clip_sigrel runs from it even uninstalled.)
#   3. bash benchmarks/cuda_check.sh; bring back $OUT (summary.txt, pytest_cuda.txt, the three JSON files,
#      logs/). For a first look without a GPU: CUDA_CHECK_DRY_RUN=1 bash benchmarks/cuda_check.sh (~2 min).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./cuda_check_out}"
mkdir -p "$OUT/logs" || exit 1
OUT="$(cd "$OUT" && pwd)"   # absolute, relative to the caller's directory
cd "$REPO" || exit 1
if [ -z "${PYTHON:-}" ]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT="${STEP_TIMEOUT:-0}"
DRY_RUN="${CUDA_CHECK_DRY_RUN:-0}"
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; DIM=64; BATCHES="${BATCHES:-256,512}"; BENCH_TRAIN_STEPS="${BENCH_TRAIN_STEPS:-4}"
  TRAIN_EXTRA=(--warmup-steps 1 --rounds 1)
  export SIGREL_CUDA_TESTS_DEVICE=cpu   # tests/integration/test_cuda.py on CPU instead of skipping
else
  DEVICE=cuda; DIM=768; BATCHES="${BATCHES:-16384,32768,65536}"; BENCH_TRAIN_STEPS="${BENCH_TRAIN_STEPS:-30}"
  TRAIN_EXTRA=()
fi
BENCH=("$PYTHON" "$REPO/benchmarks/bench.py")   # the benchmark script (not in the wheel), this interpreter

FAILURES=()
STEPS=()

# step NAME FUNCTION ARGS...: runs it with stdout + stderr teed to $OUT/logs/NAME.log; records its status.
step() {
  local name=$1 rc start log="$OUT/logs/$1.log"
  shift
  echo "=== $name: $*" | tee "$log"
  start=$(date +%s)
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  STEPS+=("$(printf '%-16s exit %-3s %5ss' "$name" "$rc" "$(( $(date +%s) - start ))")")
  [ "$rc" -ne 0 ] && FAILURES+=("$name (exit $rc, see $log)")
  echo "=== $name: exit $rc"
  return 0
}

# limited COMMAND...: COMMAND under STEP_TIMEOUT seconds (when set), exit 124 if it ran out.
limited() {
  if [ "$STEP_TIMEOUT" -gt 0 ] 2>/dev/null; then
    timeout --signal=TERM --kill-after=30 "$STEP_TIMEOUT" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "stopped after STEP_TIMEOUT=${STEP_TIMEOUT}s: $*"
    return "$rc"
  fi
  "$@"
}

environment() {
  limited "$PYTHON" - "$DEVICE" <<'EOF'
import importlib, os, platform, sys
import torch
device = sys.argv[1]
print("python", sys.version.split()[0], sys.executable, platform.platform())
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
for name in ("open_clip", "open_clip_train", "webdataset", "siglip_kernel", "triton", "open_clip_sigrel"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), os.path.dirname(mod.__file__))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
import open_clip_sigrel  # noqa: E402
import importlib.util  # noqa: E402
spec = importlib.util.spec_from_file_location("bench", os.path.join("benchmarks", "bench.py"))  # a script
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
print("open_clip-chunked:", bench.open_clip_chunked_support() or "available")
repo = os.path.realpath(os.getcwd())
where = os.path.realpath(os.path.dirname(open_clip_sigrel.__file__))
if not where.startswith(repo + os.sep):
    sys.exit(f"open_clip_sigrel is imported from {where}, not from this checkout {repo}: "
             "another installed copy shadows it (pip uninstall it, or reinstall with pip install -e .)")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
EOF
  local rc=$?
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; else echo "nvidia-smi: not found"; fi
  return $rc
}

# summarize_loss FILE [MAX_MEM_RATIO]: the bench loss JSON as a table; fails on errors other than an expected
# OOM, and where sigrel's mem_ratio reaches MAX_MEM_RATIO (not checked when empty).
summarize_loss() {
  "$PYTHON" - "$1" "${2:-}" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
max_mem_ratio = float(sys.argv[2]) if sys.argv[2] else None
problems = []
print(f"{'batch':>6} {'impl':>18} {'time_ms':>9} {'peak_MiB':>9} {'time_ratio':>10} {'mem_ratio':>9}  error")
fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
for r in doc["rows"]:
    err = r.get("error") or ""
    print(f"{r['batch']:>6} {r['impl']:>18} {fmt(r.get('time_ms'), '9.1f')} {fmt(r.get('peak_extra_MiB'), '9.1f')} "
          f"{fmt(r.get('time_ratio'), '10.3f')} {fmt(r.get('mem_ratio'), '9.3f')}  {err[:160]}")
    if err and (r["impl"] == "sigrel" or "out of memory" not in err):
        problems.append(f"{r['impl']} at batch {r['batch']} failed: {err}")
    elif r["impl"] == "sigrel" and None not in (r.get("mem_ratio"), max_mem_ratio) and r["mem_ratio"] >= max_mem_ratio:
        problems.append(f"sigrel at batch {r['batch']}: peak extra memory {r['mem_ratio']:.2f}x SigLipLoss's")
for impl, reason in doc.get("skipped_impls", {}).items():
    print(f"skipped {impl}: {reason}")
print("environment:", json.dumps(doc.get("environment", {})))
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# bench_loss DTYPE: the loss benchmark; exit 1 from bench itself is judged by summarize_loss (an OOM of
# SigLipLoss at the largest batches is a result, not a failure).
bench_loss() {
  local dtype=$1 json="$OUT/bench_loss_$1.json" rc
  rm -f "$json"
  limited "${BENCH[@]}" loss --device "$DEVICE" --batch "$BATCHES" --dim "$DIM" --dtype "$dtype" --json \
    --output "$json"
  rc=$?
  if [ ! -s "$json" ]; then
    echo "bench loss --dtype $dtype wrote no $json (exit $rc)"
    return $(( rc == 0 ? 1 : rc ))
  fi
  # sigrel below half of SigLipLoss's memory: on CUDA at these batches (the CPU dry run's sizes are too small)
  summarize_loss "$json" "$([ "$DRY_RUN" = 1 ] || echo 0.5)"
}

bench_train() {
  local json="$OUT/bench_train.json"
  rm -f "$json"
  limited "${BENCH[@]}" train --device "$DEVICE" --precision amp_bf16 --steps "$BENCH_TRAIN_STEPS" \
    ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} --logs "$OUT/logs/bench_train_runs" --json --output "$json"
}

pytest_cuda() {
  local log="$OUT/pytest_cuda.txt" rc
  limited "$PYTHON" -m pytest -q -rs tests/integration/test_cuda.py 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # On a GPU machine nothing may skip for want of CUDA (the dry run skips the one CUDA-only test).
  if [ "$DRY_RUN" != 1 ] && grep -qE "SKIPPED|[0-9]+ skipped" "$log"; then
    echo "tests/integration/test_cuda.py skipped tests on a machine meant to have CUDA (see the SKIPPED lines above)"
    [ "$rc" -eq 0 ] && rc=1
  fi
  return "$rc"
}

echo "open_clip_sigrel GPU check: device $DEVICE, results in $OUT$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN on CPU)')"
step environment environment
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device is visible to torch ($PYTHON): nothing to check here. CUDA_CHECK_DRY_RUN=1 runs the" \
       "steps on CPU." | tee "$OUT/summary.txt"
  exit 2
fi
step pytest_cuda pytest_cuda
step bench_loss_fp32 bench_loss fp32
step bench_loss_bf16 bench_loss bf16
step bench_train bench_train

{
  echo "open_clip_sigrel GPU check ($DEVICE$([ "$DRY_RUN" = 1 ] && echo ', dry run'))"
  printf '  %s\n' "${STEPS[@]}"
  if [ ${#FAILURES[@]} -eq 0 ]; then
    echo "ALL STEPS PASSED"
  else
    echo "FAILED STEPS:"
    printf '  %s\n' "${FAILURES[@]}"
  fi
} | tee "$OUT/summary.txt"
[ ${#FAILURES[@]} -eq 0 ]
