"""The import direction of the three packages: generators (floor 1) <- audit (floor 2) <- debias (floor 3).

An AST scan of every module collects what it imports: ``import`` and ``from ... import`` statements anywhere (also
inside functions), ``importlib.import_module("...")`` calls, and strings that name a module of the project
(registry entries such as ``"generators.janus:JanusGenerator"``). A lower floor must never reach a higher one,
and no set of modules may import each other in a loop.

``python tests/test_structure.py DIR`` prints what the scan finds in another checkout.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

FLOORS = {"generators": 1, "audit": 2, "debias": 3}
ROOT = Path(__file__).resolve().parents[1]
MODULE_STRING = re.compile(r"^(generators|audit|debias)(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the three packages."""
    out = {}
    for package in FLOORS:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (itself, or the longest known prefix), or None if it is outside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that ``module`` imports, by any of the means in the module docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            # `from pkg import sub` uses the submodule, as `from pkg.sub import x` does; other names use pkg itself.
            names += submodules if len(submodules) == len(node.names) else [base, *submodules]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            names.append(node.value.partition(":")[0])
    return {t for t in (_target(n, known) for n in names) if t is not None and t != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {m: imports(m, p, known) for m, p in known.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower floor to a higher one, as ``"a.b -> c.d"``."""
    floor = {m: FLOORS[m.split(".")[0]] for m in graph}
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor[a] < floor[b])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    found.append(sorted(component))
    return sorted(found)


def test_no_import_runs_from_a_lower_floor_to_a_higher_one():
    assert upward(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_scan_sees_every_kind_of_import(tmp_path):
    """The checks fail on a tree that has each kind of backward reference and a cycle (so they can fail)."""
    for package in FLOORS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "generators" / "reg.py").write_text('REG = {"lab": "debias.lab:thing"}\n')
    (tmp_path / "audit" / "lazy.py").write_text("def f():\n    from debias import cli\n")
    (tmp_path / "audit" / "dyn.py").write_text('import importlib\nimportlib.import_module("debias.cli")\n')
    (tmp_path / "debias" / "cli.py").write_text("from . import lab\n")
    (tmp_path / "debias" / "lab.py").write_text("import debias.cli\n")
    graph = import_graph(tmp_path)
    assert upward(graph) == ["audit.dyn -> debias.cli", "audit.lazy -> debias.cli", "generators.reg -> debias.lab"]
    assert cycles(graph) == [["debias.cli", "debias.lab"]]


if __name__ == "__main__":
    graph = import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print(f"{len(graph)} modules; imports that run back up:")
    print("\n".join(f"  {line}" for line in upward(graph)) or "  none")
    print("import cycles:")
    print("\n".join(f"  {' <-> '.join(c)}" for c in cycles(graph)) or "  none")
