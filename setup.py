"""Builds adjointdeis._C on the LibTorch stable ABI: one binary for every torch >= 2.13 and every CPython >= 3.10.

Switches (environment):
  ADJOINTDEIS_CUDA=0   build the CPU kernels only
  ADJOINTDEIS_CUDA=1   also build the CUDA kernels, with or without a GPU here (wheel builds and CI);
                       fail if there is no toolkit or torch is a CPU-only build
  (unset)              build the CUDA kernels only when this machine can run them: a toolkit, a CUDA
                       torch and a visible GPU
  CUDA_HOME            the toolkit root; otherwise /usr/local/cuda, then the nvcc on PATH
  TORCH_CUDA_ARCH_LIST compute capabilities to compile for; default: the visible GPUs' (unset mode) or
                       RELEASE_ARCHS (ADJOINTDEIS_CUDA=1)
  ADJOINTDEIS_TORCH_TARGET=2.11  an older stable-ABI target (OLDEST_TARGET at the least), for a machine whose
                       torch predates TARGET_TORCH (a lent GPU machine's 2.11): that build is for that machine
                       only, not a release (its Python layer is tested on TARGET_TORCH and later)

The kernels call libtorch only through its stable C shim (csrc/stable.h), compiled with
TORCH_TARGET_VERSION = TARGET_TORCH, and the module uses only Python's limited API (abi3), so the wheel
is tagged cp310-abi3 and loads in any later torch and Python.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TARGET_TORCH = (2, 13)
OLDEST_TARGET = (2, 11)
RELEASE_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc and include/cuda.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda.h")
        ):
            return os.path.realpath(root)
    return None


def visible_gpu_archs(torch):
    """"8.0;9.0"-style capabilities of the GPUs torch sees here ("" when none)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return ""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def resolve_switches():
    """(build_cuda, cuda_home, why, torch): what to build, and why not CUDA when it is off."""
    mode = os.environ.get("ADJOINTDEIS_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"ADJOINTDEIS_CUDA must be 0, 1 or unset, got {mode!r}")
    cuda_home = find_cuda_home() if mode != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch

    if mode == "0":
        return False, None, "ADJOINTDEIS_CUDA=0", torch
    why = None
    if cuda_home is None:
        why = "no CUDA toolkit found (set CUDA_HOME)"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    if mode == "1":
        if why:
            sys.exit(f"ADJOINTDEIS_CUDA=1 but the CUDA kernels cannot be built: {why}")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", RELEASE_ARCHS)
        return True, cuda_home, None, torch
    archs = "" if why else visible_gpu_archs(torch)
    if not why and not archs:
        why = "no GPU visible (ADJOINTDEIS_CUDA=1 builds them anyway)"
    if why:
        return False, None, why, torch
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
    return True, cuda_home, None, torch


def torch_target():
    """The stable-ABI target: TARGET_TORCH, or ADJOINTDEIS_TORCH_TARGET ("2.11") no older than OLDEST_TARGET."""
    value = os.environ.get("ADJOINTDEIS_TORCH_TARGET", "").strip()
    if not value:
        return TARGET_TORCH
    try:
        major, minor = (int(v) for v in value.split("."))
    except ValueError:
        sys.exit(f"ADJOINTDEIS_TORCH_TARGET must be MAJOR.MINOR (e.g. 2.11), got {value!r}")
    if (major, minor) < OLDEST_TARGET or (major, minor) > TARGET_TORCH:
        sys.exit(f"ADJOINTDEIS_TORCH_TARGET must lie between {'.'.join(map(str, OLDEST_TARGET))} and "
                 f"{'.'.join(map(str, TARGET_TORCH))}, got {value!r}")
    return major, minor


def extension_modules():
    build_cuda, cuda_home, why, torch = resolve_switches()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    target_torch = torch_target()
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < target_torch:
        sys.exit(f"adjointdeis builds against torch >= {'.'.join(map(str, target_torch))}, "
                 f"found torch {torch.__version__}")
    target = f"-DTORCH_TARGET_VERSION=0x{target_torch[0]:02x}{target_torch[1]:02x}000000000000"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": ["-O3", "-fvisibility=hidden", target]}
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""
    print(
        f"adjointdeis build: torch {torch.__version__} (stable ABI target {'.'.join(map(str, target_torch))}), "
        f"CUDA kernels {'ON' if build_cuda else 'OFF'}"
        + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list})" if build_cuda else f": {why}"),
        flush=True,
    )
    write_build_info(torch, target_torch, build_cuda, arch_list)
    # An in-place build of the unstable-ABI era (_C.cpython-3XX-*.so) would shadow _C.abi3.so on import.
    for stale in glob.glob(os.path.join(ROOT, "adjointdeis", "_C.cpython-*.so")):
        os.remove(stale)
    options = dict(extra_compile_args=extra, py_limited_api=True)
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", target, "-DUSE_CUDA"]
        return [CUDAExtension("adjointdeis._C", sources, **options)]
    return [CppExtension("adjointdeis._C", sources, **options)]


def write_build_info(torch, target_torch, build_cuda, arch_list):
    """Records what _C is built against, readable even when _C itself cannot be loaded."""
    info = {
        "torch_target": ".".join(map(str, target_torch)),
        "built_with_torch": torch.__version__,
        "torch_cuda": torch.version.cuda if build_cuda else None,
        "cuda_kernels": build_cuda,
        "cuda_arch_list": arch_list,
    }
    with open(os.path.join(ROOT, "adjointdeis", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    # extension_modules() sets CUDA_HOME, which torch.utils.cpp_extension reads when first imported:
    # resolve the switches before that import.
    modules = extension_modules()
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
          options={"bdist_wheel": {"py_limited_api": "cp310"}})
