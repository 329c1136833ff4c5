"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Every ``import`` and ``from ... import`` statement of every module of ``fedmutual`` counts, at module
level or inside a function, class or ``if TYPE_CHECKING`` block alike: each is a dependency of the
module that contains it. The checks:

- no import cycles among fedmutual modules;
- the layers (:data:`LAYERS`, lowest first) import only downwards: nothing in a layer imports from a
  layer above it. Modules outside the layers (``config``, ``losses``, ``models``, ...) are not
  constrained here; a layer that does not exist yet is empty;
- outside ``fedmutual.algorithms``, no code special-cases an algorithm by name: no comparison (``==``,
  ``!=``, ``in``, ``is``, ``match``) with an attribute or variable named ``algorithm``, or with the
  name of a built-in algorithm as a string. Each algorithm's behaviour belongs in its own class.
  :data:`ABOUT_NAMED_METHODS` lists the modules whose subject is named methods rather than behaviour.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fedmutual"

# Lowest first: a module of a layer may import from its own layer and the ones before it, never after.
LAYERS = (
    "fedmutual.engine",  # the training kernel
    "fedmutual.protocol",
    "fedmutual.algorithms",
    "fedmutual.runtimes",
    "fedmutual.experiment",
    "fedmutual.deploy",  # parties on their own machines: nodes and the Flower apps
    "fedmutual.cli",
)
ALGORITHMS = "fedmutual.algorithms"


@dataclass(frozen=True)
class Import:
    """One dependency: ``source`` imports ``target`` at ``line`` of ``path``."""

    source: str
    target: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} imports {self.target}"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by the name of its ``__init__``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _tree(name: str) -> ast.Module:
    path = MODULES[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(name: str) -> str:
    return str(MODULES[name].relative_to(ROOT))


def _known(dotted: str) -> str | None:
    """The fedmutual module that importing ``dotted`` refers to: the longest prefix that is one."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _imports(name: str) -> Iterator[Import]:
    """The fedmutual modules that module ``name`` imports, one entry per imported module and statement."""
    is_package = MODULES[name].name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(_tree(name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the containing package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub; ``from mod import obj`` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in dict.fromkeys(targets):
            known = _known(target) if target.split(".")[0] == PACKAGE else None
            if known is not None and known != name:
                yield Import(name, known, _rel(name), node.lineno)


GRAPH: dict[str, list[Import]] = {name: list(_imports(name)) for name in MODULES}


def _cycles() -> list[list[Import]]:
    """One cycle through each strongly connected group of modules (Tarjan), as the imports that close it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in GRAPH[v]:
            w = edge.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        members, start = set(group), group[0]
        # breadth-first from start back to start, within the group: the shortest cycle through it
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        found: list[Import] | None = None
        while queue and found is None:
            v = queue.pop(0)
            for edge in GRAPH[v]:
                if edge.target == start:
                    found = paths[v] + [edge]
                    break
                if edge.target in members and edge.target not in paths:
                    paths[edge.target] = paths[v] + [edge]
                    queue.append(edge.target)
        cycles.append(found or [])
    return cycles


def test_no_import_cycles():
    cycles = _cycles()
    report = "\n\n".join(
        " -> ".join([c[0].source] + [e.target for e in c]) + "\n" + "\n".join(f"  {e}" for e in c) for c in cycles
    )
    assert not cycles, f"{len(cycles)} import cycle(s) among fedmutual modules:\n{report}"


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_nothing_from_the_layers_above(layer):
    rank = LAYERS.index(layer)
    wrong = []
    for module, edges in GRAPH.items():
        if _layer(module) == rank:
            for edge in edges:
                above = _layer(edge.target)
                if above is not None and above > rank:
                    wrong.append(f"{edge}  ({LAYERS[above]} is above {layer})")
    assert not wrong, f"{layer} must import nothing from {', '.join(LAYERS[rank + 1:])}:\n" + "\n".join(wrong)


def builtin_algorithm_names() -> set[str]:
    """The names the built-in algorithms register: ``name = "..."`` in the class bodies of fedmutual.algorithms."""
    names = set()
    for module in MODULES:
        if module == ALGORITHMS or module.startswith(ALGORITHMS + "."):
            for node in ast.walk(_tree(module)):
                if isinstance(node, ast.ClassDef):
                    for stmt in node.body:
                        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "name" for t in stmt.targets)
                                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                            names.add(stmt.value.value)
    return names


def _names_algorithm(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "algorithm") or (isinstance(node, ast.Name) and node.id == "algorithm")


def _algorithm_literals(node: ast.AST, names: set[str]) -> list[str]:
    """The built-in algorithm names among a string constant or a tuple, list or set of them."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str) and i.value in names]


def special_cases(module: str, names: set[str]) -> list[str]:
    """Where ``module`` compares with an ``algorithm`` attribute or variable or with a built-in algorithm's name."""
    source = MODULES[module].read_text(encoding="utf-8")
    out = []
    for node in ast.walk(_tree(module)):
        why = []
        if isinstance(node, ast.Compare) and all(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)) for op in node.ops
        ):
            operands = [node.left, *node.comparators]
            if any(_names_algorithm(o) for o in operands):
                why.append("compares an `algorithm` attribute or variable")
            literals = [name for o in operands for name in _algorithm_literals(o, names)]
            if literals:
                why.append(f"compares with the algorithm name(s) {', '.join(map(repr, literals))}")
        elif isinstance(node, ast.Match):
            if _names_algorithm(node.subject):
                why.append("matches on an `algorithm` attribute or variable")
            literals = [name for case in node.cases for p in ast.walk(case.pattern)
                        if isinstance(p, ast.MatchValue) for name in _algorithm_literals(p.value, names)]
            if literals:
                why.append(f"matches the algorithm name(s) {', '.join(map(repr, literals))}")
        if why:
            code = (ast.get_source_segment(source, node) or "").splitlines()[0]
            out.append(f"{_rel(module)}:{node.lineno}: {'; '.join(why)}: {code}")
    return out


def _areas() -> list[str]:
    """The top-level subpackages and modules of fedmutual outside the algorithms, one test each."""
    areas = {".".join(m.split(".")[:2]) for m in MODULES if m != PACKAGE}
    return sorted(areas - {ALGORITHMS}) + [PACKAGE]


def test_builtin_algorithm_names_are_found():
    assert {"fedavg", "fml", "dfml", "dmlfl"} <= builtin_algorithm_names()


#: Modules about named methods, not their behaviour: the papers' claims compare FML with FedAvg, DFML with DFedAvg, ...
ABOUT_NAMED_METHODS = {"fedmutual.experiment.claims"}


def test_the_modules_about_named_methods_exist():
    assert ABOUT_NAMED_METHODS <= set(MODULES)


@pytest.mark.parametrize("area", _areas())
def test_no_special_case_by_algorithm_name(area):
    names = builtin_algorithm_names()
    modules = [m for m in MODULES if (m == area or (area != PACKAGE and m.startswith(area + "."))) and m not in ABOUT_NAMED_METHODS]
    found = [line for m in modules for line in special_cases(m, names)]
    assert not found, (
        f"{area} special-cases algorithms by name (their behaviour belongs in fedmutual.algorithms):\n" + "\n".join(found)
    )
