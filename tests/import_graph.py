"""writeguard's own import graph, read from the source (AST), for the layout and image tests.

Every ``import`` counts, at module level or inside a function (a deferred import is still a dependency), and
under ``if TYPE_CHECKING:`` too. Nodes are dotted module names (``stream.cli``); an edge goes to the module
imported, or to the package when a name is imported from its ``__init__``.

>>> graph = import_graph(["detectors"])
>>> "detectors.features" in graph["detectors.engine"]
True
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("stream", "detectors", "undo", "connectors")
FIRST_PARTY = (*PRODUCT, "testbed", "tests", "benchmarks")


def module_files(packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages' folders."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: Mapping[str, Path]) -> str:
    """The longest prefix of ``name`` that is a known module (``stream.config.Config`` -> ``stream.config``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return name


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The first-party modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in FIRST_PARTY:
                target = _resolve(name, known)
                if target != module:
                    out.add(target)
    return out


def import_graph(packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports, for every module of ``packages``.

    A target outside ``packages`` (say ``tests.integration.conftest``, when only the product is read) is kept
    under its dotted name, so that a rule about it can still be checked.
    """
    files = module_files(packages)
    known = {**module_files(FIRST_PARTY), **files}
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected component of more than one module, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)
