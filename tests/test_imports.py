"""No import cycles in teleflm, between files or between packages, counting imports inside functions
too (a lazy import hides a cycle from Python, not from whoever reads the code)."""

import ast
from graphlib import CycleError, TopologicalSorter

from tests.conftest import REPO


def module_imports() -> dict[str, set[str]]:
    """teleflm module -> the teleflm modules it imports (a name imported from a module counts as that
    module, or as the submodule of that name when there is one)."""
    root = REPO / "teleflm"
    paths = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        paths[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target not in (None, module, "teleflm"):
                    found.add(target)
        graph[module] = found
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        return e.args[1]
    return None


def test_no_cycle_between_files():
    graph = module_imports()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the imports
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_no_cycle_between_packages():
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in module_imports().items():
        graph.setdefault(package(module), set()).update(
            package(t) for t in targets if package(t) != package(module)
        )
    assert cycle(graph) is None, f"package import cycle: {' -> '.join(cycle(graph))}"


def test_the_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
