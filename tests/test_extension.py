"""Loading the compiled extension, and the command line that reports what was built."""

import json
import subprocess
import sys

import pytest
import torch

import adjointdeis
from adjointdeis import _extension, ops


def test_build_info_matches_the_running_torch():
    info = _extension.build_info()
    assert info["torch"] == torch.__version__
    assert info["cuda_kernels"] == (ops.cuda_version() >= 0)
    if info["cuda_kernels"]:
        wanted = {a.replace(".", "").replace("+PTX", "") + "0" for a in info["cuda_arch_list"].split(";")}
        assert set(ops.cuda_arch_list().split(",")) == wanted


def test_import_error_names_the_torch_it_was_built_for(tmp_path, monkeypatch):
    stale = tmp_path / "_build_info.json"
    stale.write_text(json.dumps({"torch": "1.13.0", "cuda_kernels": False}))
    monkeypatch.setattr(_extension, "_BUILD_INFO", stale)
    with pytest.raises(ImportError, match=r"built for torch 1\.13\.0.*rebuild"):
        _extension.load()


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
    assert f"_C built against torch {torch.__version__}" in result.stdout


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
