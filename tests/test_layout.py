"""The package layout, read statically with ``ast`` (nothing is imported): no import cycle between cspine's
packages, the client importing nothing of the server side, one module per ambiguous name.

A *unit* is a subpackage of cspine (``analysis``, ``dicom``, ``commands``, ``ops`` …) or a module directly in it
(``pipeline``, ``service``, ``domain``, ``config`` …); ``cspine`` is the package's own ``__init__``. Every import
statement counts, wherever it stands: at module level, inside a function (a lazy import, to keep start-up cheap
or a heavy dependency deferred) or under ``TYPE_CHECKING``. A lazy import still means that one package needs
the other to work, and the cycle issue 18 named ran through one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cspine

ROOT = Path(cspine.__file__).resolve().parent
PACKAGE = ROOT.name

# What the client library may need: the domain types, the error root, the generated messages, __version__.
CLIENT_MAY_IMPORT = {"client", "domain", "errors", "v1", PACKAGE}

# Names the issue found on several modules, each meaning something else; one module (or package) each now.
# commands/ is left out: it has one module per CLI family, named as the family (commands/bench.py is `cspine bench`).
ONE_MODULE_PER_NAME = ("report", "bench", "pipeline", "k8s", "embedded", "shapes")


@dataclass(frozen=True)
class Edge:
    """One import of ``target`` (a dotted module) by ``module``, in ``path`` at ``line``."""

    module: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line} imports {self.target}"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_module(name: str) -> bool:
    return name in MODULES or (ROOT.parent / name.replace(".", "/")).is_dir()  # a namespace package (modeling/)


def _imports(module: str, path: Path) -> list[Edge]:
    """The cspine modules ``module`` imports, wherever the import stands in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from cspine import pipeline` imports the module cspine.pipeline; `from cspine.x import name`, cspine.x
            targets = [
                f"{source}.{alias.name}" if _is_module(f"{source}.{alias.name}") else source for alias in node.names
            ]
        else:
            continue
        edges += [Edge(module, t, path, node.lineno) for t in targets if t == PACKAGE or t.startswith(f"{PACKAGE}.")]
    return edges


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def unit_graph() -> dict[str, dict[str, list[Edge]]]:
    """unit → unit it imports → the imports that make the dependency."""
    graph: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for module, path in MODULES.items():
        graph[_unit(module)]  # every unit is a node, importing or not
        for edge in _imports(module, path):
            if _unit(edge.target) != _unit(module):
                graph[_unit(module)][_unit(edge.target)].append(edge)
    return graph


def _components(graph: dict[str, dict[str, list[Edge]]]) -> list[list[str]]:
    """The strongly connected components of more than one unit: the units that import each other, directly or
    through others (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _cycle_in(graph: dict[str, dict[str, list[Edge]]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first unit (breadth-first), as [a, b, …, a]."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in component:
                    continue
                if child == start:
                    path = [node]  # back from the unit that closes the cycle to the start
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def _explain(graph: dict[str, dict[str, list[Edge]]], component: list[str]) -> str:
    """A shortest cycle of the component, with an import that makes each of its steps."""
    cycle = _cycle_in(graph, set(component))
    lines = [" → ".join(cycle) + (f" (all of {', '.join(component)} import each other)" if len(component) > 2 else "")]
    for a, b in zip(cycle, cycle[1:], strict=False):
        edges = graph[a][b]
        lines.append(f"  {a} → {b}: {edges[0]}" + (f" (and {len(edges) - 1} more)" if len(edges) > 1 else ""))
    return "\n".join(lines)


def test_the_cycle_finder_reports_a_cycle_with_the_imports_that_make_it():
    graph: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for a, b in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("x", "a")):
        graph[a][b].append(Edge(f"{PACKAGE}.{a}", f"{PACKAGE}.{b}", ROOT / f"{a}.py", 3))
    for leaf in ("e", "y"):
        graph[leaf] = defaultdict(list)
    (component,) = _components(graph)
    assert component == ["a", "b", "c"]
    assert _cycle_in(graph, set(component)) == ["a", "b", "c", "a"]
    assert f"c → a: {PACKAGE}/c.py:3 imports {PACKAGE}.a" in _explain(graph, component)
    assert _components({"x": {"y": []}, "y": {}}) == []


def test_lazy_imports_inside_functions_count_as_dependencies():
    imports = {e.target for e in _imports(f"{PACKAGE}.commands.bench", ROOT / "commands" / "bench.py")}
    assert f"{PACKAGE}.bench.triton" in imports  # imported in cmd_bench_triton only


def test_no_import_cycle_between_packages():
    graph = unit_graph()
    assert {"analysis", "commands", "ops", "bench", "pipeline", "domain", PACKAGE} <= set(graph)
    components = _components(graph)
    assert not components, "import cycles between cspine's packages:\n" + "\n".join(
        _explain(graph, c) for c in components
    )


def test_the_client_imports_nothing_of_the_server_side():
    graph = unit_graph()
    reached, pending = set(), ["client"]
    while pending:  # everything the client's imports import in turn
        unit = pending.pop()
        if unit not in reached:
            reached.add(unit)
            pending += graph[unit]
    server_side = reached - CLIENT_MAY_IMPORT
    assert not server_side, "cspine.client reaches " + "; ".join(
        str(e) for unit in sorted(reached) for target in sorted(server_side) for e in graph[unit].get(target, [])
    )


def test_each_ambiguous_name_names_one_module():
    for name in ONE_MODULE_PER_NAME:
        found = sorted(
            str(path.relative_to(ROOT))
            for module, path in MODULES.items()
            if module.rpartition(".")[2] == name and _unit(module) != "commands"
        )
        assert len(found) <= 1, f"{name!r} names {found}: one name per concept"


def test_offline_and_ops_modules_live_in_ops():
    assert {f"{PACKAGE}.ops.k8s", f"{PACKAGE}.ops.embedded"} <= set(MODULES)
    assert not {f"{PACKAGE}.k8s", f"{PACKAGE}.embedded"} & set(MODULES)
