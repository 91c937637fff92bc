#!/usr/bin/env bash
# One call on a GPU machine (no network; torch, triton, pytest, pytest-benchmark, ninja already
# installed): build the extension for this card, run the whole test suite including GPU tests,
# run the benchmarks, and write logs, JSON and plots into one folder. Designed for < 10 minutes.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT, else ./gpu-suite-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-suite-out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/suite.log"; }
status=0

{
  nvidia-smi || true
  python -c "import torch, sys; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0))"
  python -c "import triton; print('triton', triton.__version__)" || true
} > "$OUT_DIR/machine.txt" 2>&1

# Build for this card only (fast), in place, against the installed torch.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; M,m=torch.cuda.get_device_capability(); print(f"{M}.{m}")')"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PLUGLM_FORCE_CUDA=1
log "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! timeout 180 python setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  log "BUILD FAILED (see build.log)"; status=1
fi
python -m pluglm.cli info > "$OUT_DIR/info.txt" 2>&1 || true

log "tests (GPU tests included)"
timeout 270 python -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
  > "$OUT_DIR/tests.log" 2>&1 || { log "TESTS FAILED (see tests.log)"; status=1; }
tail -5 "$OUT_DIR/tests.log" | tee -a "$OUT_DIR/suite.log"

log "sweep (pluglm bench --quick on cuda)"
timeout 90 python -m pluglm.cli bench --quick --device cuda --no-progress --out "$OUT_DIR/bench" \
  > "$OUT_DIR/bench.log" 2>&1 || { log "BENCH FAILED (see bench.log)"; status=1; }

log "pytest-benchmark files"
timeout 45 python -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json="$OUT_DIR/pytest-benchmark.json" \
  > "$OUT_DIR/pytest-benchmark.log" 2>&1 || { log "BENCHMARK FILES FAILED"; status=1; }

log "done, status $status; results in $OUT_DIR"
exit $status
