"""The package's import graph, read from the sources: no cycle anywhere (imports inside functions included; those
under TYPE_CHECKING never run and are left out), and no layer imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "nanoseek"

# lowest first: a module imports from its own layer and the ones below, never from one above
LAYERS = [
    {"errors", "validate", "device", "memory"},
    {"models.common.config"},  # the configs: no torch, beneath every model
    {"models.deepseek_v3.config"},
    {"models.deepseek_v32.config", "models.llama.config"},
    {"models.deepseek_v4.config"},
    {"config"},  # registers them all: config.json's model_type → its class
    {"presets"},  # presets depend on the configs, never the reverse
    {"models", "models.common"},
    {"models.deepseek_v3"},
    {"models.deepseek_v32", "models.llama"},  # V3.2 and the dense baseline: each the diff of V3
    {"models.deepseek_v4"},  # V4 builds on V3.2's indexer
    {"models.registry"},
    {"fp8", "data", "flops"},
    {"checkpoint"},
    {"parallel"},
    {"train"},
    {"infer"},
    {"post", "bench"},
    {"cli", "__main__", ""},
]


def _module_name(path: Path) -> str:
    parts = ("nanoseek", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    return [
        node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped
    ]


def import_graph() -> dict[str, set[str]]:
    """module → the nanoseek modules it imports (a `from package import module` names the module)."""
    sources = {_module_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, tree in sources.items():
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "nanoseek"}
            elif node.module and node.module.split(".")[0] == "nanoseek" and node.level == 0:
                graph[name] |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sources else node.module
                    for a in node.names
                }
    return graph


def _unit(module: str) -> str:
    """A layer's unit: a top-level module or package; in models/, a generation's package, its config apart."""
    parts = module.split(".")[1:]
    if parts[:1] != ["models"] or len(parts) == 1:
        return ".".join(parts[:1])
    return ".".join(parts[:3]) if parts[2:3] == ["config"] else ".".join(parts[:2])


def _layer(module: str) -> int:
    unit = _unit(module)
    found = [i for i, layer in enumerate(LAYERS) if unit in layer]
    assert found, f"{module} is in no layer of tests/test_imports.py's LAYERS: place it there"
    return found[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], found = 1, None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()) or [])


def test_no_layer_imports_one_above_it():
    upward = sorted(
        f"{a} imports {b}" for a, targets in import_graph().items() for b in targets if _layer(b) > _layer(a)
    )
    assert not upward, upward


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_the_cycle_search_finds_what_is_there(graph, expected):
    assert _cycle(graph) == expected
