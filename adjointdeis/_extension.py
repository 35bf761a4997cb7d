"""Loads the compiled extension adjointdeis._C and says how to fix a missing build or a torch too old for it.

_C is built on the LibTorch stable ABI with ``TORCH_TARGET_VERSION`` set to the oldest supported torch
(``torch_target`` in ``_build_info.json``): it loads in that torch and every later one, whichever torch
built it, and in every CPython from 3.10 on (abi3).
"""

import json
import pathlib
import platform
import re

import torch

_BUILD_INFO = pathlib.Path(__file__).with_name("_build_info.json")
_HOW_TO_BUILD = (
    "build it from the source checkout with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`)"
)


def build_info() -> dict:
    """What _C was built with: the stable-ABI target torch, the building torch, CUDA kernels ({} if unknown)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _cpuinfo() -> str:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The widest x86 vector extensions the CPU reports (what the multiversioned loops pick at load time), e.g.
    "AVX2, no AVX-512" or "AVX-512, AVX-512-BF16, AMX"; "" without a flags line. `cpuinfo`: the text of
    /proc/cpuinfo (read when None)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if not flags:
        return ""
    if "avx512f" not in flags:
        return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return ", ".join(name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"),
                                             ("amx_tile", "AMX")) if flag in flags)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name (else what the platform module reports) with its ISA in parentheses, as every
    benchmark table names its machine. `cpuinfo`: the text of /proc/cpuinfo (read when None)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    isa = cpu_isa(text)
    return f"{name} ({isa})" if isa else name


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "2.14.1+cu130" or "2.15.0.dev20261001"."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def load():
    """Imports adjointdeis._C.

    Raises:
        ImportError naming both versions when the installed torch is older than the stable-ABI target
        _C was built for, and saying how to build _C when it is missing or fails to load.
    """
    info = build_info()
    target = info.get("torch_target")
    if target is not None and _release(torch.__version__)[:2] < _release(target)[:2]:
        raise ImportError(
            f"adjointdeis._C needs torch >= {target} (its LibTorch stable-ABI target), but torch "
            f"{torch.__version__} is installed: upgrade torch (pip install 'torch>={target}')"
        )
    try:
        from adjointdeis import _C
    except ImportError as error:
        if not info:
            raise ImportError(f"adjointdeis._C is not built; {_HOW_TO_BUILD}") from error
        raise ImportError(
            f"adjointdeis._C (stable ABI, torch >= {target}) failed to load under torch {torch.__version__}: "
            f"{error}; {_HOW_TO_BUILD}"
        ) from error
    return _C
