"""The tree a newcomer reads: short files, layers that never import upwards, no import cycle.

The import graph counts every import statement in a module, at the top or inside a function
(a lazy import closes a cycle just as well), between the project's own modules; only imports
under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unlearning", "pipelines", "benchmarks")
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (for `from a import b`, a.b if it is a module)."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 40  # every module was read
    assert cycles(graph) == []


def test_layers_never_import_upwards():
    """unlearning/ imports neither pipelines/ nor benchmarks/; pipelines/ never benchmarks/."""
    for module, targets in import_graph().items():
        layer = module.split(".")[0]
        above = {"unlearning": ("pipelines", "benchmarks"), "pipelines": ("benchmarks",)}.get(layer, ())
        assert not [t for t in targets if t.split(".")[0] in above], module


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_python_file_is_over_400_lines(module):
    lines = len(module_files()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


def test_readme_lines_are_at_most_100_characters():
    long = [i for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1) if len(line) > 100]
    assert long == []


def test_no_library_module_chooses_a_matplotlib_backend():
    """Plots are drawn on matplotlib.figure.Figure: pyplot and matplotlib.use (global state a
    notebook's user owns) are left to the CLI, which sets MPLBACKEND (pipelines/cli)."""
    offenders = []
    for module, path in module_files().items():
        if module.startswith("benchmarks"):  # scripts with their own entry point, not the library
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "matplotlib.use":
                names = ["matplotlib.use"]
            offenders += [f"{module}: {name}" for name in names if name in ("matplotlib.pyplot", "matplotlib.use")]
    assert offenders == []
