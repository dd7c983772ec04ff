"""Imports point down: every module of the packages imports only its own layer and those below
it (``benchmarks.LAYERS``), and the modules' imports, lazy ones included, form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks import LAYERS

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nws", "benchmarks", "baselines", "analysis")


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(module: str, names: list[str]) -> set[str]:
    """The suite's modules an import statement loads: ``from P import m`` is P.m if a module."""
    found = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if module in MODULES and (len(found) < len(names) or not names):
        found.add(module)
    return found


def imports(name: str) -> set[str]:
    """Every suite module ``name`` imports, anywhere in the file but under TYPE_CHECKING."""
    tree = ast.parse(MODULES[name].read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                out |= _resolve(a.name, [])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= _resolve(node.module, [a.name for a in node.names])
    return out - {name}


def layer(name: str) -> int:
    """The rank of the innermost layer holding ``name`` (its longest prefix in LAYERS)."""
    best = max((len(p), rank) for rank, prefixes in enumerate(LAYERS) for p in prefixes
               if name == p or name.startswith(p + "."))
    return best[1]


def test_every_module_has_a_layer_and_the_layers_are_declared_once():
    flat = [p for prefixes in LAYERS for p in prefixes]
    assert len(flat) == len(set(flat))
    assert all(layer(m) >= 0 for m in MODULES)
    assert len(MODULES) > 50  # the scan found the packages


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    up = sorted(f"{m} ({LAYERS[layer(m)][0]})" for m in imports(name) if layer(m) > layer(name))
    assert not up, f"{name} ({LAYERS[layer(name)][0]}) imports a higher layer: {up}"


def test_at_most_ten_modules_directly_in_benchmarks():
    top = [p.name for p in (REPO / "benchmarks").glob("*.py")]
    assert len(top) <= 10, top


def test_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rule_catches_what_it_should():
    """The checks are not vacuous: a core module importing the engine would be caught."""
    assert layer("benchmarks.core.store") < layer("benchmarks.engine.harness")
    assert layer("nws.search") < layer("benchmarks.core.store")
    assert layer("analysis.tables") < layer("benchmarks.engine.harness")
    assert layer("baselines.packnet") == layer("benchmarks.methods.contract")
    assert _resolve("benchmarks.models", ["archs"]) == {"benchmarks.models.archs"}
