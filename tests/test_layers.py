"""The house plan's layer rules (ARCHITECTURE.md, "Rules of the house"), read off
the imports of every module of the package: upper layers import lower ones,
never the reverse; ``protocol``/``codec`` know nothing of asyncio; ``registry``
knows nothing of the transport; ``cluster`` sees nodes, not the transport; no
import cycles.

Every import counts, a function's own too (a lazy import is a dependency all
the same)."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

import octo_core

PACKAGE = os.path.dirname(octo_core.__file__)

#: The modules callers use, above everything else of the package: no lower layer
#: may reach back up into them.
TOP = {"octo_core.client", "octo_core.blocking_client", "octo_core.server", "octo_core.cli",
       "octo_core.bench"}


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")]
    name = relative.replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imports(path: str) -> Set[str]:
    """Every module ``path`` imports, anywhere in it, relative imports resolved."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # (submodules)
    return found


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                graph[_module_name(path)] = _imports(path)
    return graph


GRAPH = _graph()


def _within(module: str, layers: Set[str]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def _reaching(modules: Set[str], forbidden: Set[str]) -> Dict[str, Set[str]]:
    """Of ``modules``, those that import something in ``forbidden``, with what."""
    return {m: {i for i in GRAPH[m] if _within(i, forbidden)} for m in sorted(modules)
            if any(_within(i, forbidden) for i in GRAPH[m])}


def _of(*layers: str) -> Set[str]:
    return {m for m in GRAPH if _within(m, set(layers))}


def test_the_graph_sees_every_module_and_its_lazy_imports():
    assert "octo_core.protocol" in GRAPH and "octo_core.registry.zookeeper" in GRAPH
    # (cli imports the benchmarks inside its functions only)
    assert "octo_core.bench.rpc" in GRAPH["octo_core.cli"]


@pytest.mark.parametrize("layer", ["octo_core.protocol", "octo_core.codec", "octo_core.errors",
                                   "octo_core.checks", "octo_core.idl"])
def test_sans_io_modules_know_nothing_of_asyncio(layer):
    assert _reaching(_of(layer), {"asyncio", "octo_core.transport"}) == {}


def test_no_lower_layer_imports_the_callers_modules():
    lower = set(GRAPH) - _of(*TOP) - {"octo_core", "octo_core.__main__"}
    assert _reaching(lower, TOP) == {}


def test_the_registry_knows_nothing_of_the_transport_or_the_cluster():
    assert _reaching(_of("octo_core.registry"),
                     {"octo_core.transport", "octo_core.cluster"}) == {}


def test_the_cluster_sees_nodes_not_the_transport():
    # (the task plumbing its hedging shares with the transport is octo_core.tasks)
    assert _reaching(_of("octo_core.cluster"), {"octo_core.transport"}) == {}


def _cycle_from(start: str) -> List[str]:
    """A chain of imports from ``start`` back to itself, or ``[]``. A module's import
    of itself or of a package it is inside (``from octo_core.registry import schema``
    in ``registry.base``) is no edge: the package is imported before its modules."""
    path, seen = [start], set()

    def walk(module: str) -> bool:
        for imported in sorted(GRAPH[module]):
            if imported not in GRAPH or module == imported or module.startswith(imported + "."):
                continue
            if imported == start:
                return True
            if imported not in seen:
                seen.add(imported)
                path.append(imported)
                if walk(imported):
                    return True
                path.pop()
        return False

    return path + [start] if walk(start) else []


def test_no_module_imports_itself_through_others():
    cycles = [cycle for cycle in map(_cycle_from, sorted(GRAPH)) if cycle]
    assert cycles == []
