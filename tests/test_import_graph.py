"""No import circle between the repository's own modules.

The graph is read from the source with `ast` (nothing is imported): one node per module of the
first-party packages (papo_kernels, papo, train, benchmarks, experiments; scripts/ is not a package,
so nothing can import it and it cannot close a circle), one edge per `import` / `from ... import`
of another first-party module.

Every import statement is an edge, wherever it stands: at module level, inside a function, or under
`if TYPE_CHECKING:`. A function-level import defers the circle to call time instead of removing it:
the two modules still need each other, neither can be read or tested alone, and a later top-level
import (or an import-order change) turns it back into an ImportError of a partly initialized module.
So moving an import into a function is not a way to pass this test; moving the shared piece into a
module both can import is. (`importlib.import_module` with a computed name, as the backend registry
uses for the optional backends, is not an edge: it names a module only at run time.)

An import of a package's submodule (`from papo.config import X`) is an edge to that submodule, not
to the package's `__init__`; `from papo import X` is an edge to `papo/__init__.py`. The compiled
extension (`papo_kernels._C`, named by setup.py's EXT_NAME) is a module too, one that imports no
first-party module: `from papo_kernels import _C` is an edge to it, whether it is built or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("papo_kernels", "papo", "train", "benchmarks", "experiments")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def native_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name: setup.py} for the compiled extension setup.py builds (its EXT_NAME), if any."""
    setup = root / "setup.py"
    if not setup.exists():
        return {}
    for node in ast.parse(setup.read_text(), filename=str(setup)).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["EXT_NAME"]
                and isinstance(node.value, ast.Constant)):
            return {node.value.value: setup}
    return {}


def first_party_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of `packages` under `root`, and the compiled
    extension (whose file, setup.py, is read for imports as a module with none of its own)."""
    modules = dict(native_modules(root))
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[_module_name(path, root)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module that importing `name` loads last: `name` itself, or (for a name
    inside a module, e.g. a function) the longest module prefix of it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules that `module` (the file `path`) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `level - 1` levels above this module's
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b` loads a.b when b is a submodule, else the name b of module a
            targets = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = first_party_modules(root, packages)
    native = native_modules(root)
    return {name: set() if name in native else imports_of(name, path, modules)
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected
    component with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
    return [_circle_in(component, graph) for component in components]


def _circle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first back to it)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not a circle")


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["train.trainer"], "the graph was not read (wrong root?)"
    assert "papo_kernels._C" in graph["papo_kernels.extension"], "the compiled extension is not a module"
    cycles = find_cycles(graph)
    assert not cycles, "import circles (a -> b: a imports b):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """A circle closed by each kind of import statement is found and named."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")  # function level
    (pkg / "sub" / "c.py").write_text("from .. import a as _a\n")  # relative, a module by name
    (pkg / "d.py").write_text("from pkg.a import something\n")  # into the circle, not part of it
    (pkg / "e.py").write_text("from pkg import f\n")
    (pkg / "f.py").write_text("from pkg.e import x\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.d"] == {"pkg.a"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert sorted(find_cycles(graph)) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"],
                                          ["pkg.e", "pkg.f", "pkg.e"]]
    (pkg / "b.py").write_text("def f():\n    pass\n")
    (tmp_path / "setup.py").write_text('EXT_NAME = "pkg._native"\n')
    (pkg / "g.py").write_text("from pkg import _native\n")  # the compiled module, not pkg/__init__
    (pkg / "__init__.py").write_text("from pkg import g\n")
    assert import_graph(tmp_path, ("pkg",))["pkg.g"] == {"pkg._native"}
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.e", "pkg.f", "pkg.e"]]
