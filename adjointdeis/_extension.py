"""Loads the compiled extension adjointdeis._C and says how to fix a missing or stale build."""

import json
import pathlib

import torch

_BUILD_INFO = pathlib.Path(__file__).with_name("_build_info.json")
_HOW_TO_BUILD = (
    "build it from the source checkout with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`)"
)


def build_info() -> dict:
    """What _C was built against: torch version, CUDA kernels and architectures ({} if unknown)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def load():
    """Imports adjointdeis._C, raising an ImportError that says how to build it if that fails."""
    info = build_info()
    built_for = info.get("torch")
    if built_for is not None and built_for != torch.__version__:
        raise ImportError(
            f"adjointdeis._C was built for torch {built_for}, but torch {torch.__version__} is "
            f"installed; rebuild against this torch: {_HOW_TO_BUILD}"
        )
    try:
        from adjointdeis import _C
    except ImportError as error:
        if not info:
            raise ImportError(f"adjointdeis._C is not built; {_HOW_TO_BUILD}") from error
        raise ImportError(
            f"adjointdeis._C (built for torch {built_for}) failed to load: {error}; {_HOW_TO_BUILD}"
        ) from error
    return _C
