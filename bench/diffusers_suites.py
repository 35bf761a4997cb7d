"""Runs diffusers' own scheduler test suites against diffusers' classes and against ours (a manual check).

diffusers' tests are not in its PyPI package and are never copied into this repository: they are read from a
git mirror of the diffusers repository (``git show``) into a fresh temporary directory, with every module
they import relatively (tests/testing_utils.py, tests/others/test_utils.py, the package __init__ files,
tests/conftest.py), and run there with pytest against the installed diffusers, one process per mode:

  theirs   the files as they are: diffusers' class (the baseline);
  ours     the test class's ``scheduler_classes`` set to ``(FusedMultistepScheduler,)``, nothing else changed;
  family   the family class of the suite (``FusedDPMSolverMultistepScheduler`` /
           ``FusedDEISMultistepScheduler``) as ``scheduler_classes``, and the test module's global name of the
           diffusers class rebound to it, so the tests that name the class (``test_switch``) run ours too.

The swap is a pytest plugin written next to the extracted tests and applied at collection time; the test
bodies are not edited. ``torchsde`` must be importable or diffusers' own ``test_compatibles`` fails
(DPMSolverSDEScheduler); ``--deps`` adds a ``pip install --target`` directory to the path.

Usage:
  python bench/diffusers_suites.py --mirror /path/to/diffusers.git [--suites dpm_multi deis]
                                   [--modes theirs ours family] [--deps DIR] [--json out.json]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# suite -> (test file, test class, the diffusers class it tests, our family class)
SUITES = {
    "dpm_multi": ("tests/schedulers/test_scheduler_dpm_multi.py", "DPMSolverMultistepSchedulerTest",
                  "DPMSolverMultistepScheduler", "FusedDPMSolverMultistepScheduler"),
    "deis": ("tests/schedulers/test_scheduler_deis.py", "DEISMultistepSchedulerTest", "DEISMultistepScheduler",
             "FusedDEISMultistepScheduler"),
}
MODES = ("theirs", "ours", "family")
ALWAYS = ("tests/__init__.py", "tests/conftest.py", "tests/schedulers/__init__.py")

PLUGIN = '''
import os
import sys

MODE = os.environ["SUITE_MODE"]
TARGETS = {targets}


def pytest_collection_modifyitems(session, config, items):
    if MODE == "theirs":
        return
    import adjointdeis.diffusers as ours
    for cls in {{item.cls for item in items if getattr(item, "cls", None) is not None}}:
        if cls.__name__ not in TARGETS:
            continue
        theirs_name, family_name = TARGETS[cls.__name__]
        swap = ours.FusedMultistepScheduler if MODE == "ours" else getattr(ours, family_name)
        cls.scheduler_classes = (swap,)
        if MODE == "family":
            setattr(sys.modules[cls.__module__], theirs_name, swap)
'''


def git(mirror: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", mirror, *args], check=True, capture_output=True, text=True).stdout


def relative_imports(path: str, text: str) -> list[str]:
    """Repository paths of the modules the file at `path` imports with ``from .x`` / ``from ..x``."""
    found = []
    for dots, name in re.findall(r"^\s*from\s+(\.+)([\w.]*)\s+import", text, flags=re.M):
        base = Path(path).parent
        for _ in range(len(dots) - 1):
            base = base.parent
        found.append(str(base.joinpath(*name.split("."))) + ".py" if name else str(base / "__init__.py"))
    return found


def extract(mirror: str, roots: list[str], dest: Path) -> list[str]:
    """Writes `roots`, what they import relatively (transitively) and their packages' __init__s under `dest`."""
    todo, done = [*roots, *ALWAYS], []
    while todo:
        path = todo.pop()
        if path in done:
            continue
        text = git(mirror, "show", f"HEAD:{path}")
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text(text)
        done.append(path)
        todo += relative_imports(path, text)
        todo += [str(parent / "__init__.py") for parent in Path(path).parents if str(parent) != "."]
    return sorted(done)


def run_mode(dest: Path, node: str, mode: str, pythonpath: list[str], timeout: int) -> dict:
    """name -> {"outcome", "message"} for every test of `node`, from pytest's JUnit report."""
    report = dest / f"junit-{mode}.xml"
    env = dict(os.environ, SUITE_MODE=mode, PYTHONPATH=os.pathsep.join([*pythonpath, str(dest)]),
               PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-m", "pytest", node, "-p", "_adjointdeis_plugin", "-p", "no:cacheprovider",
                    "-q", "-o", "addopts=", f"--junitxml={report}", "--rootdir", str(dest)],
                   cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase") if report.exists() else ():
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = "failed" if tag == "failure" else tag
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0][:300] if lines else ""
                break
        results[case.get("name")] = {"outcome": outcome, "message": message}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", required=True, help="a git directory of the diffusers repository")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--deps", help="an extra directory for sys.path (torchsde installed with pip --target)")
    parser.add_argument("--json", help="write every outcome here")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()

    import diffusers
    print(f"diffusers {diffusers.__version__}; tests from {git(args.mirror, 'log', '-1', '--format=%h %s').strip()}")
    dest = Path(tempfile.mkdtemp(prefix="diffusers_suites_"))
    try:
        extract(args.mirror, [SUITES[s][0] for s in args.suites], dest)
        targets = {SUITES[s][1]: SUITES[s][2:] for s in args.suites}
        (dest / "_adjointdeis_plugin.py").write_text(PLUGIN.format(targets=repr(targets)))
        pythonpath = [str(ROOT)] + ([args.deps] if args.deps else [])
        everything = {}
        for suite in args.suites:
            path, cls = SUITES[suite][:2]
            node = f"{path}::{cls}"
            runs = {mode: run_mode(dest, node, mode, pythonpath, args.timeout) for mode in args.modes}
            everything[suite] = runs
            names = sorted(set().union(*runs.values()))
            width = max(map(len, names), default=10)
            print(f"\n== {node} ==\n{'test':<{width}}  " + "  ".join(f"{m:<8}" for m in args.modes))
            for name in names:
                print(f"{name:<{width}}  " + "  ".join(f"{runs[m].get(name, {}).get('outcome', '-'):<8}"
                                                      for m in args.modes))
            for mode, results in runs.items():
                counts = {k: sum(r["outcome"] == k for r in results.values())
                          for k in ("passed", "failed", "error", "skipped")}
                print(f"{mode:>8}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(results)}")
                for name, r in sorted(results.items()):
                    if mode != "theirs" and r["outcome"] in ("failed", "error"):
                        print(f"    {name}: {r['message']}")
        if args.json:
            Path(args.json).write_text(json.dumps(everything, indent=1))
    finally:
        shutil.rmtree(dest)


if __name__ == "__main__":
    main()
