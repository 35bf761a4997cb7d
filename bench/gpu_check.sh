#!/usr/bin/env bash
# The GPU check, one call on a lent CUDA machine: build the CUDA kernels in place, run every CUDA test of the
# package, then its CUDA benchmarks (fused step, adjoint kernels, DSNO layer, a whole ad.sample call eager /
# in one CUDA graph / under torch.compile "reduce-overhead" against diffusers' loop), and print one table of
# what ran, how long it took and how it ended. Run from the repository root:
#   bash bench/gpu_check.sh            on the GPU machine (stages capped so that the whole run fits 8 minutes)
#   bash bench/gpu_check.sh --dry-run  on a CPU machine: the same stages on the CPU with tiny sizes and the
#                                      in-place build as it is, to check the script itself
# Logs (one per stage) and the benchmarks' JSON go to "$OUT" when that is set, else to a temporary folder.
#
# The lent machines run torch 2.11, older than the stable-ABI target of a release (2.13): the build there sets
# ADJOINTDEIS_TORCH_TARGET to the installed torch (setup.py allows 2.11 on), a build for that machine only.
# diffusers is not installed there: when a folder .whl/ holds its wheel (and any missing dependency), it is
# installed from there first (see the device tool's notes on carrying wheels), else the diffusers baseline and
# the diffusers CUDA test say why they did not run.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi

if [ "$DRY" -eq 0 ] && ! python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  echo "no CUDA device: nothing to check (bash bench/gpu_check.sh --dry-run checks the script on a CPU)"
  exit 0
fi

LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
START=$SECONDS
# shellcheck source=bench/stages.sh
source bench/stages.sh

if [ "$DRY" -eq 0 ]; then
  if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    else CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
  fi
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" ADJOINTDEIS_CUDA=1
  # Build with the system compiler that matches the system libstdc++: an extension built there by a
  # newer /opt/gcc against /usr/include/c++ headers crashed formatting an error message (std::ostream).
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
  release=$(python3 -c "import torch; print('.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
  if python3 -c "import sys; sys.exit(tuple(map(int, '$release'.split('.'))) >= (2, 13))"; then
    export ADJOINTDEIS_TORCH_TARGET="$release"
  fi
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  DEVICE=cuda
  BENCH_TIME=0.1
else
  DEVICE=cpu
  BENCH_TIME=0.01
fi
export PYTHONUNBUFFERED=1

machine() {
  if [ "$DRY" -eq 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if [ "$DRY" -eq 0 ]; then nvcc --version | tail -n 2; fi
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} ADJOINTDEIS_TORCH_TARGET=${ADJOINTDEIS_TORCH_TARGET:-} dry-run=$DRY"
}

extension_ok() {
  python3 -c "
from adjointdeis import ops
print('adjointdeis._C: CUDA', ops.cuda_version(), 'arch', ops.cuda_arch_list())
assert $DRY or ops.cuda_version() > 0, 'adjointdeis._C was built without CUDA kernels'"
}

build() {
  if [ "$DRY" -eq 1 ]; then extension_ok; return; fi
  python3 setup.py build_ext --inplace >"$LOG_DIR/build_output.txt" 2>&1 || { tail -n 40 "$LOG_DIR/build_output.txt"; return 1; }
  grep "adjointdeis build:" "$LOG_DIR/build_output.txt"
  extension_ok
}

cuda_tests() {  # every test of the package that runs on CUDA (marked cuda or parametrized over the device)
  local rc=0
  python3 -m pytest -q -p no:cacheprovider tests -k "cuda or CUDA" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "no CUDA tests selected (pytest exit 5)"; return 0; fi
  return "$rc"
}

bad_input_tests() {
  python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_adjoint_ops.py tests/test_fourier_conv.py -k "bad_input"
}

export DRY LOG_DIR
export -f machine extension_ok build cuda_tests bad_input_tests
stage "machine" 30 machine
if ! stage "build" 240 build; then
  echo "the build failed: nothing else can run"
else
  stage "CUDA tests" 150 cuda_tests
  stage "bad-input tests" 45 bad_input_tests
  stage "bench fused step" 60 python3 bench/bench_step.py --device "$DEVICE" --min-run-time "$BENCH_TIME" \
    --json "$LOG_DIR/bench_step.json"
  stage "bench adjoint kernels" 45 python3 bench/bench_adjoint_ops.py --device "$DEVICE"
  stage "bench DSNO layer" 60 python3 bench/bench_fourier_conv.py --device "$DEVICE" --dtype float32 --dtype bfloat16 \
    --min-run-time "$BENCH_TIME" --json "$LOG_DIR/bench_fourier_conv.json"
  if [ "$DRY" -eq 1 ]; then
    stage "bench sample: graph, compile" 120 python3 bench/bench_cuda_graph.py --dry-run
  else
    stage "bench sample: graph, compile" 120 python3 bench/bench_cuda_graph.py --device cuda
  fi
fi

print_summary gpu_check
exit "$FAILED"
