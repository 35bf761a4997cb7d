"""The package's import graph: library layers import only downward, applications are never imported by the
library, and no module imports itself back through a circle (docs/architecture.md).

The layer map below is the one place the layers are written down. Every import statement counts, those
inside functions too, and importing ``adjointdeis.a.b`` also runs the package ``adjointdeis.a``.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

import adjointdeis

PACKAGE = pathlib.Path(adjointdeis.__file__).parent

# Library modules (relative to adjointdeis; "" is the package root) and their layers: a library module
# imports library modules of its own layer or lower ones, never an application.
LAYERS = {
    "_extension": 0, "reference": 0, "ops": 0,                       # the compiled ops and their twins
    "validation": 0,                                                 # the argument checks everything shares
    "schedules": 1, "predictions": 1, "thresholding": 1,             # alpha, sigma, grids; what models predict
    "solvers": 2, "models": 2,                                       # coefficient tables; calling models
    "planning": 3, "k_diffusion_plans": 3,                           # a run's plan and the run loop; k-diffusion's plans
    "gradients": 4,                                                  # gradients through a run
    "sampling": 5,                                                   # sample()
    "ctm": 6, "guidance": 6, "k_diffusion": 6, "diagnostics": 6,     # integrations and tools
    "metrics": 6, "images": 6,
    "dsno": 6, "dsno.layer": 6, "dsno.model": 6,
    "diffusers": 6, "diffusers.config": 6, "diffusers.scheduler": 6, "diffusers.pipeline": 6,
    "zoo": 7, "zoo.networks": 7, "zoo.data": 7,                      # the shipped models
    "": 8,                                                           # the public surface
}
# Compiled modules: below everything.
COMPILED = {"_C"}
# Applications: they import the library (and each other), the library never imports them.
APPLICATIONS = {"__main__", "cli", "demo", "benchmarks", "dsno.distillation", "zoo.train", "zoo.training",
                "zoo.reflow", "zoo.distill", "zoo.finetune"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (PACKAGE.joinpath(*name.split(".")) / "__init__.py").is_file() if name else True


def is_module(name: str) -> bool:
    return name in COMPILED or is_package(name) or PACKAGE.joinpath(*name.split(".")).with_suffix(".py").is_file()


def packages_above(name: str) -> set[str]:
    """The packages whose __init__ runs before module `name` (the root's excepted: it always runs first)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules that the file imports, by name relative to adjointdeis."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
                if not (prefix == "adjointdeis" or prefix.startswith("adjointdeis.")):
                    continue
                prefix = prefix[len("adjointdeis."):] if prefix != "adjointdeis" else ""
            joined = [f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names]
            targets = [t if is_module(t) else prefix for t in joined]
        else:
            continue
        for target in targets:
            if isinstance(node, ast.Import):
                if not (target == "adjointdeis" or target.startswith("adjointdeis.")):
                    continue
                target = target[len("adjointdeis."):] if target != "adjointdeis" else ""
            # Importing a.b also runs a's __init__, unless a is a package the importer itself lives in.
            found |= {target} | (packages_above(target) - packages_above(name))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_the_layer_map():
    modules = set(import_graph())
    unmapped = modules - set(LAYERS) - APPLICATIONS
    assert not unmapped, f"add these modules to LAYERS or APPLICATIONS in {__file__}: {sorted(unmapped)}"
    assert not set(LAYERS) & APPLICATIONS
    assert not (set(LAYERS) | APPLICATIONS) - modules, "the layer map names modules that do not exist"


def test_library_imports_only_downward_and_no_application():
    violations = []
    for module, targets in import_graph().items():
        if module in APPLICATIONS:
            continue
        for target in sorted(targets):
            if target in APPLICATIONS:
                violations.append(f"{module or 'adjointdeis'} imports the application {target}")
            elif target in COMPILED:
                continue
            elif LAYERS[target] > LAYERS[module]:
                violations.append(f"{module or 'adjointdeis'} (layer {LAYERS[module]}) imports {target} "
                                  f"(layer {LAYERS[target]})")
    assert not violations, "\n".join(violations)


def test_no_import_circles():
    graph = import_graph()
    state, stack, circles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target == "":
                continue   # the root package is initialised before any of its modules
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_walk_sees_lazy_and_parent_package_imports():
    """The checks above would miss violations if the walk missed these kinds of import."""
    graph = import_graph()
    assert "demo" in graph["cli"]                          # inside a function
    assert {"zoo", "zoo.data"} <= graph["demo"]            # `from .zoo.data import ...` runs zoo/__init__
    assert "dsno" in graph["zoo"] and "dsno.model" in graph["dsno.distillation"]
    assert "" in graph["cli"]                              # `from . import __version__`


def test_importing_the_library_loads_no_application():
    pytest.importorskip("diffusers")
    code = ("import sys, adjointdeis, adjointdeis.diffusers, adjointdeis.zoo, adjointdeis.k_diffusion; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('adjointdeis'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    loaded = {name[len("adjointdeis."):] if name != "adjointdeis" else "" for name in result.stdout.split()}
    assert "diffusers.scheduler" in loaded and "zoo.networks" in loaded
    assert not loaded & APPLICATIONS, sorted(loaded & APPLICATIONS)
