"""Import structure of biwm-core: no module-level import cycles (lazy imports inside functions are
how the stages and plugins stay out of each other's way)."""

from __future__ import annotations

import ast

from conftest import ROOT

CORE = ROOT / "biwm-core" / "src" / "biwm" / "core"


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(("biwm", "core", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only; `if TYPE_CHECKING:` is skipped
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("biwm.core"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from biwm.core import x` (a module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("biwm.core"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_biwm_core_has_no_module_level_import_cycle():
    graph = module_imports()
    assert {"biwm.core.recipe", "biwm.core.runner", "biwm.core.stages", "biwm.core.sampling"} <= set(graph)
    assert "biwm.core.plugins" in graph["biwm.core.recipe"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
