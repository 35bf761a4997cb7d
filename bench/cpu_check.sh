#!/usr/bin/env bash
# The CPU check: every CPU performance target of the package measured side by side in one call, on the in-place
# build as it is, then one table of the targets (bench/cpu_targets.py). Run from the repository root, on a quiet
# machine (nothing else running: the benchmarks compare times taken in the same process):
#   bash bench/cpu_check.sh            about 10 minutes on a 2-core machine
#   bash bench/cpu_check.sh --quick    small sizes and short timing, to check the script itself (about 2 minutes)
# Logs (one per stage) and the benchmarks' JSON go to "$OUT" when that is set, else to a temporary folder.
set -uo pipefail

cd "$(dirname "$0")/.."
QUICK=()
SECONDS_PER=""
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); SECONDS_PER="--min-run-time 0.05"; fi

LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
START=$SECONDS
# shellcheck source=bench/stages.sh
source bench/stages.sh
export PYTHONUNBUFFERED=1
KEEP_PAGES=(env MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824)

machine() {
  python3 -c "
import os, sys, torch
sys.path.insert(0, '.')
from adjointdeis.benchmarks import cpu_name
print(cpu_name(), '|', os.cpu_count(), 'cores | torch', torch.__version__, '| load', os.getloadavg())"
}

export -f machine
stage "machine" 30 machine
stage "fused step, 2 threads" 240 python3 bench/bench_step.py --threads 2 "${QUICK[@]}" --json "$LOG_DIR/step.json"
stage "sample loop, 2 threads" 120 python3 bench/bench_sample.py --breakdown --threads 2 $SECONDS_PER \
  --json "$LOG_DIR/sample_2.json"
stage "sample loop, 2 threads, pages kept" 120 "${KEEP_PAGES[@]}" python3 bench/bench_sample.py --breakdown --threads 2 \
  $SECONDS_PER --json "$LOG_DIR/sample_2_kept.json"
stage "sample loop, 1 thread" 120 python3 bench/bench_sample.py --breakdown --threads 1 $SECONDS_PER \
  --json "$LOG_DIR/sample_1.json"
stage "DSNO layer, 1 thread" 240 python3 bench/bench_fourier_conv.py --threads 1 --dtype float32 --dtype bfloat16 \
  "${QUICK[@]}" --json "$LOG_DIR/fourier.json"
stage "gradients floor, 1 thread" 240 python3 bench/bench_gradients.py --only floor --threads 1 "${QUICK[@]}" \
  --json "$LOG_DIR/gradients_1.json"
stage "gradients floor, 2 threads" 240 python3 bench/bench_gradients.py --only floor --threads 2 "${QUICK[@]}" \
  --json "$LOG_DIR/gradients_2.json"

echo
echo "== targets"
python3 bench/cpu_targets.py "$LOG_DIR" || FAILED=1
print_summary cpu_check
exit "$FAILED"
