"""Loading the compiled extension (the LibTorch stable ABI, abi3), and the command line that reports what
was built."""

import json
import pathlib
import struct
import subprocess
import sys

import pytest
import torch

import adjointdeis
from adjointdeis import _extension, ops


def test_build_info_matches_the_binary():
    info = _extension.build_info()
    assert info["torch_target"] == "2.13"
    assert _extension._release(torch.__version__)[:2] >= (2, 13)
    assert info["cuda_kernels"] == (ops.cuda_version() >= 0)
    if info["cuda_kernels"]:
        wanted = {a.replace(".", "").replace("+PTX", "") + "0" for a in info["cuda_arch_list"].split(";")}
        assert set(ops.cuda_arch_list().split(",")) == wanted
    else:
        assert ops.cuda_arch_list() == ""


def undefined_dynamic_symbols(path):
    """Names of the undefined symbols in an ELF64 shared object's .dynsym (what it imports)."""
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)]
    dynsym = next(sec for sec in sections if sec[1] == 11)  # SHT_DYNSYM
    strtab = sections[dynsym[6]]
    names = []
    for offset in range(dynsym[4], dynsym[4] + dynsym[5], 24):
        name, _, _, shndx = struct.unpack_from("<IBBH", data, offset)
        if shndx == 0 and name:
            start = strtab[4] + name
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF symbol table of a Linux build")
def test_binary_uses_only_the_stable_c_shim_and_the_limited_api():
    """_C imports libtorch only through C functions of its stable shim (no C++ symbol of at::, c10:: or
    torch::, which tie a binary to one torch) and is an abi3 module."""
    path = adjointdeis._C.__file__
    assert path.endswith(".abi3.so")
    imported = undefined_dynamic_symbols(path)
    assert "torch_call_dispatcher" in imported and "aoti_torch_get_sizes" in imported
    cxx_torch = [name for name in imported if name.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "_ZNK2at",
                                                              "_ZNK3c10", "_ZNK5torch"))]
    assert cxx_torch == []
    python = [name for name in imported if name.startswith(("Py", "_Py"))]
    assert python == ["PyModule_Create2"]


def test_import_error_names_both_versions_for_a_torch_older_than_the_target(monkeypatch):
    monkeypatch.setattr(_extension.torch, "__version__", "2.12.1+cpu")
    with pytest.raises(ImportError, match=r"needs torch >= 2\.13 .*torch 2\.12\.1\+cpu is installed"):
        _extension.load()


@pytest.mark.parametrize("version", ["2.13.0", "2.14.1+cu130", "2.15.0.dev20261001", "3.0.0"])
def test_newer_torches_load(monkeypatch, version):
    monkeypatch.setattr(_extension.torch, "__version__", version)
    assert _extension.load() is adjointdeis._C


def test_import_error_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_BUILD_INFO", tmp_path / "missing.json")
    monkeypatch.setitem(sys.modules, "adjointdeis._C", None)  # makes the import fail
    monkeypatch.delattr(adjointdeis, "_C")
    with pytest.raises(ImportError, match="not built.*pip install --no-build-isolation"):
        _extension.load()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "adjointdeis", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_info():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"adjointdeis {adjointdeis.__version__}" in result.stdout
    info = _extension.build_info()
    assert (f"_C: LibTorch stable ABI for torch >= 2.13, built with torch {info['built_with_torch']}"
            in result.stdout)
    kernels = "CUDA kernels: compiled with CUDA" if info["cuda_kernels"] else "CUDA kernels: not compiled"
    assert kernels in result.stdout
    assert f"CPU: {_extension.cpu_name()}, " in result.stdout


ZEN4_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16"
SPR_FLAGS = "sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("flags, isa", [
    (ZEN4_FLAGS, "AVX-512, AVX-512-BF16"), (SPR_FLAGS, "AVX-512, AVX-512-BF16, AMX"),
    ("sse2 avx avx2 fma", "AVX2, no AVX-512"), ("sse2 sse4_2", "no AVX2"), (None, "")])
def test_cpu_name_names_the_model_and_its_widest_isa(flags, isa):
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU 9000\n" + (f"flags\t\t: {flags}\n" if flags else "")
    assert _extension.cpu_isa(cpuinfo) == isa
    assert _extension.cpu_name(cpuinfo) == (f"Some CPU 9000 ({isa})" if isa else "Some CPU 9000")


def test_cli_accuracy_reports_converging_errors():
    result = run_cli("accuracy", "--steps", "10", "40")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"ddim-1", "deis-2", "deis-3", "dpmpp-2", "dpmpp-3", "heun-2"}
    for solver, (coarse, fine) in rows.items():
        assert fine < coarse / 3, solver  # 4x the steps: at least first-order convergence


def test_cli_rejects_bad_steps():
    result = run_cli("accuracy", "--steps", "0")
    assert result.returncode != 0 and "--steps: must be a positive integer" in result.stderr
