"""kernelhub's import graph has no cycle, lazy imports inside functions included.

The graph is read from the source, not from `sys.modules`: every `import` and `from ... import`
statement anywhere in a module (module level, functions, methods, `if` blocks) is an edge, with
relative imports resolved. Importing `a.b.c` runs the `__init__` of `a` and `a.b` first, so it
depends on all three; `from pkg import name` depends on `pkg` and its parents, and on `pkg.name`
too where that is a module of ours. The packages a module sits in are the exception: Python has
begun running their `__init__` before the module itself, so importing a sibling runs nothing of
theirs again (a package's `__init__` may import its own submodules, as long as nothing outside
the package that those import leads back to it).

Source folders map to packages as pyproject.toml installs them: kernelhub/ -> kernelhub,
reference/ -> kernelhub.reference, tuning/ -> kernelhub.tuning, db/ -> kernelhub.db.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kernelhub": ROOT / "kernelhub", "kernelhub.reference": ROOT / "reference",
            "kernelhub.tuning": ROOT / "tuning", "kernelhub.db": ROOT / "db"}


def modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name (a package by its `__init__.py`)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: what importing it runs."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that module `name` (at `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.update(with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets.update(with_parents(source))
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    enclosing = set(with_parents(name))  # the module and the packages it sits in
    return {t for t in targets if t in known and t not in enclosing}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [m0, m1, ..., m0], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_graph_covers_the_packages():
    graph = import_graph()
    assert {"kernelhub.registry", "kernelhub.kernels.loader", "kernelhub.reference.int8_gemm",
            "kernelhub.tuning.tuner", "kernelhub.db.exchange"} <= set(graph)
    # The parent packages of what is imported count: the loader runs each family's __init__.
    assert {"kernelhub.kernels.int8_gemm", "kernelhub.kernels.int8_gemm.spec"} <= graph["kernelhub.kernels.loader"]
    assert "kernelhub.reference" in graph["kernelhub.kernels.int8_gemm.spec"]


def test_relative_imports_and_lazy_imports_count(tmp_path):
    module = tmp_path / "spec.py"
    module.write_text("from . import space\nfrom ..common import sizes\n\ndef f():\n    import kernelhub.db.store\n")
    known = {"kernelhub", "kernelhub.db", "kernelhub.db.store", "kernelhub.kernels", "kernelhub.kernels.common",
             "kernelhub.kernels.common.sizes", "kernelhub.kernels.fam", "kernelhub.kernels.fam.space"}
    assert imports_of("kernelhub.kernels.fam.spec", module, known) == {
        "kernelhub.kernels.fam.space", "kernelhub.kernels.common", "kernelhub.kernels.common.sizes",
        "kernelhub.db", "kernelhub.db.store"}  # not the packages it sits in: those have begun already


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
