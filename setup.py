"""Builds adjointdeis._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Switches (environment):
  ADJOINTDEIS_CUDA=0   build CPU kernels only
  ADJOINTDEIS_CUDA=1   require the CUDA kernels (fail if no toolkit or a CPU-only torch)
  (unset)              build CUDA kernels when possible; no visible GPU is needed
  CUDA_HOME            the toolkit root; otherwise /usr/local/cuda, then the nvcc on PATH
  TORCH_CUDA_ARCH_LIST compute capabilities to compile for (default "8.0;9.0")
"""

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def resolve_switches():
    mode = os.environ.get("ADJOINTDEIS_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"ADJOINTDEIS_CUDA must be 0, 1 or unset, got {mode!r}")
    cuda_home = find_cuda_home() if mode != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch

    torch_has_cuda = torch.version.cuda is not None
    build_cuda = mode != "0" and cuda_home is not None and torch_has_cuda
    if mode == "1" and not build_cuda:
        why = "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else (
            f"torch {torch.__version__} is a CPU-only build")
        sys.exit(f"ADJOINTDEIS_CUDA=1 but the CUDA kernels cannot be built: {why}")
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return build_cuda, cuda_home, torch


def extension_modules():
    build_cuda, cuda_home, torch = resolve_switches()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": ["-O3"]}
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""
    print(
        f"adjointdeis build: torch {torch.__version__}, CUDA kernels "
        f"{'ON' if build_cuda else 'OFF'}"
        + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list})" if build_cuda else "")
        + f", ADJOINTDEIS_CUDA={os.environ.get('ADJOINTDEIS_CUDA', '<unset>')}",
        flush=True,
    )
    write_build_info(torch, build_cuda, arch_list)
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("adjointdeis._C", sources, extra_compile_args=extra)]
    return [CppExtension("adjointdeis._C", sources, extra_compile_args=extra)]


def write_build_info(torch, build_cuda, arch_list):
    """Records what _C is built against, readable even when _C itself cannot be loaded."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
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

    setup(ext_modules=modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
