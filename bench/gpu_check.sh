#!/usr/bin/env bash
# GPU check for a lent CUDA machine: build the CUDA kernels in place, run the CUDA tests, time the
# fused step (float32 and bfloat16), the adjoint kernels and the DSNO temporal layer. Run from the
# repository root: `bash bench/gpu_check.sh`.
# Without a visible GPU or nvcc it says so and exits 0. Logs go to "$OUT" when that is set.
# Stages are capped (tests 150 + 60 s, benchmarks 120 + 60 + 90 s) so that the whole script, build included,
# fits one 10-minute device call.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1 \
    || { ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
  echo "no CUDA device: skipping GPU checks"
  exit 0
fi

LOG_DIR="${OUT:-}"
if [ -n "$LOG_DIR" ]; then
  mkdir -p "$LOG_DIR"
  exec > >(tee "$LOG_DIR/gpu_check.log") 2>&1
fi
START=$SECONDS
stage() { echo; echo "== $1 ($((SECONDS - START)) s)"; }

if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  :
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  CUDA_HOME=/usr/local/cuda
else
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 ADJOINTDEIS_CUDA=1
# Build with the system compiler that matches the system libstdc++: an extension built there by a
# newer /opt/gcc against /usr/include/c++ headers crashed formatting an error message (std::ostream).
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -n 2
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CXX=${CXX:-default}"

extension_ok() {
  python3 -c "
from adjointdeis import ops
assert ops.cuda_version() > 0, 'adjointdeis._C was built without CUDA kernels'
print('adjointdeis._C: CUDA', ops.cuda_version(), 'arch', ops.cuda_arch_list())"
}

stage "build (pip install -e)"
if ! python3 -m pip install --no-build-isolation --no-deps -e . || ! extension_ok; then
  stage "build (pip editable failed; setup.py build_ext --inplace)"
  python3 setup.py build_ext --inplace
  extension_ok
fi

stage "tests (-k cuda; then the bad-input tests, which once crashed there)"
if ! python3 -c "import pytest" >/dev/null 2>&1; then
  echo "pytest is not installed: skipping the CUDA tests"
elif [ ! -d tests ]; then
  echo "no tests/ directory: skipping the CUDA tests"
else
  rc=0
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests -k "cuda or CUDA" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "no CUDA tests selected (pytest exit 5): OK"
  elif [ "$rc" -ne 0 ]; then
    echo "CUDA tests failed (pytest exit $rc)"
    exit "$rc"
  fi
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_adjoint_ops.py tests/test_fourier_conv.py \
    -k "bad_input" \
    || echo "bad-input tests failed or crashed (exit $?)"
fi

stage "benchmark (cuda, float32 and bfloat16; target 80% of copy bandwidth)"
bench_args=(--device cuda --min-run-time 0.1 --rounds 2)
if [ -n "$LOG_DIR" ]; then bench_args+=(--json "$LOG_DIR/bench_cuda.json"); fi
timeout 120 python3 bench/bench_step.py "${bench_args[@]}"

stage "adjoint kernels (discrete_adjoint_step, multi_tensor_axpy_) against copy bandwidth"
timeout 60 python3 bench/bench_adjoint_ops.py --device cuda

stage "DSNO temporal layer (fourier_temporal_conv vs the FFT reference, float32 and bfloat16)"
fourier_args=(--device cuda --dtype float32 --dtype bfloat16 --min-run-time 0.05)
if [ -n "$LOG_DIR" ]; then fourier_args+=(--json "$LOG_DIR/bench_fourier_conv.json"); fi
timeout 90 python3 bench/bench_fourier_conv.py "${fourier_args[@]}"

stage "done"
