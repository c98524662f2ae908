"""The floor plan holds: no import cycles, and no module imports from a floor above its own.

Floors, from the ground up (docs/interfaces.md):
ground helpers (``utils.errors``, ``utils.dist``, ...) ← networks (``models``) ←
methods (``policies``) ← the application (the rest of ``utils``) ← entry points
and ``scripts``. Every import counts, also one inside a function.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = {"utils.errors", "utils.dist", "utils.seeding", "utils.stats", "utils.checkpoint",
          "utils.amp", "utils.timing", "utils.files"}
FLOORS = ("ground", "networks", "methods", "application", "entry points")


def floor(module: str) -> int:
    if module in GROUND:
        return 0
    top = module.split(".")[0]
    return {"models": 1, "policies": 2, "utils": 3}.get(top, 4)


def project_modules() -> dict[str, str]:
    """Module name -> file, for the project's packages and root scripts."""
    found = {}
    for package in ("models", "policies", "utils", "scripts"):
        for folder, _dirs, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                    module = rel.replace(os.sep, ".").removesuffix(".__init__")
                    found[module] = os.path.join(folder, name)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            found[name[:-3]] = os.path.join(ROOT, name)
    return found


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (absolute or relative, at any depth)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n in known and n != module}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    edges = graph()
    # a package importing its own submodules is not a cycle of the floor plan
    pruned = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
    assert cycles(pruned) == []


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [f"{m} ({FLOORS[floor(m)]}) imports {d} ({FLOORS[floor(d)]})"
              for m, deps in graph().items() for d in sorted(deps) if floor(d) > floor(m)]
    assert upward == []


def test_method_names_are_compared_only_in_the_registry():
    """Outside ``policies/``, no code compares a method name or checks a method's class."""
    from policies.registry import method_names

    names = method_names()
    hits = []
    for module, path in project_modules().items():
        if module.startswith("policies"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and _compares_a_name(node, names):
                hits.append(f"{path}:{node.lineno}")
    assert hits == []


def _compares_a_name(node: ast.Compare, names: tuple[str, ...]) -> bool:
    """``x == "seq"``, ``"seq" != x``, ``x in ("blockdrop", "seq")`` (a literal collection
    of names); ``"seq" in parts`` asks about something else named alike."""
    def named(side: ast.expr) -> bool:
        return isinstance(side, ast.Constant) and side.value in names

    sides = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, sides[:-1], sides[1:], strict=True):
        equality = isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot))
        if equality and (named(left) or named(right)):
            return True
        literal = isinstance(right, (ast.Tuple, ast.List, ast.Set))
        if isinstance(op, (ast.In, ast.NotIn)) and literal and any(map(named, right.elts)):
            return True
    return False


@pytest.mark.parametrize("bad", [{"a": {"b"}, "b": {"a"}}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}])
def test_the_cycle_finder_finds_cycles(bad):
    assert cycles(bad) != []
