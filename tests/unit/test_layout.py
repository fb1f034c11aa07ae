"""The package's shape, checked on its source: import direction between the layers, no import cycle,
functions short enough to read at once."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "patchcore_dist"
MAX_FUNCTION_LINES = 60

# layer -> what it must never import (package layers and third-party top-level modules)
FORBIDDEN = {
    "core": {"patchcore_dist.artifacts", "patchcore_dist.pipeline", "patchcore_dist.render", "patchcore_dist.synthetic",
             "patchcore_dist.cli", "ray", "pyarrow", "deltalake"},
    "artifacts": {"patchcore_dist.pipeline", "patchcore_dist.cli", "ray"},
    "render": {"patchcore_dist.pipeline", "patchcore_dist.cli", "ray"},
    "synthetic": {"patchcore_dist.pipeline", "patchcore_dist.cli", "ray"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = ("patchcore_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports count), as absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from . import storage" names a module
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_layers_exist():
    for layer in ("core", "artifacts", "pipeline", "render", "synthetic", "cli"):
        assert f"patchcore_dist.{layer}" in MODULES


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_import_direction(layer):
    bad = []
    for name, path in MODULES.items():
        if name == f"patchcore_dist.{layer}" or name.startswith(f"patchcore_dist.{layer}."):
            for imp in _imports(path):
                if any(imp == f or imp.startswith(f + ".") for f in FORBIDDEN[layer]):
                    bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_only_the_pipeline_imports_ray():
    users = sorted(n for n, p in MODULES.items() if any(i == "ray" or i.startswith("ray.") for i in _imports(p)))
    assert users and all(n.startswith("patchcore_dist.pipeline.") for n in users), users


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_relative_imports_are_resolved():
    """The walk resolves relative imports (the package writes all its imports that way)."""
    graph = _graph()
    assert "patchcore_dist.artifacts.storage" in graph["patchcore_dist.artifacts.inputs"]
    assert "patchcore_dist.errors" in graph["patchcore_dist.core.preprocessing"]


def test_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_every_exception_is_defined_in_errors():
    defined = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))) for b in node.bases):
                defined.append(f"{name}.{node.name}")
    internal = {"patchcore_dist.core.backbones._Done"}  # the extractor's own early-exit signal
    assert all(d.startswith("patchcore_dist.errors.") or d in internal for d in defined), defined


def test_test_modules_have_unique_names():
    """pytest imports test modules by their basename (no packages under tests/): two of one name
    stop the whole suite at collection."""
    tests = pathlib.Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)


def test_ruff_finds_nothing():
    """pyflakes, pycodestyle and bugbear (the rules in pyproject.toml) over the package, the tests, the
    benchmarks and the jobs: an unused import or a closure over a loop variable fails here."""
    import subprocess

    from ruff.__main__ import find_ruff_bin
    root = PACKAGE.parent
    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", str(root)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
