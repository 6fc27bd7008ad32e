"""The package's shape: no import cycles (function-level imports included), layers that stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import alexnet_jax

PACKAGE = Path(alexnet_jax.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code (a lazy import is still an edge)."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:  # from . import x
                    edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax."):
                edges.add(node.module.split(".")[1])
        graph[name] = {e for e in edges if (PACKAGE / f"{e}.py").exists()} - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_cycles():
    graph = {k: v for k, v in _imports().items() if k != "__init__"}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    "module, must_not_import",
    [
        ("steps", {"train", "parallel", "checkpoint", "data"}),  # pure steps: core dependencies only
        ("model", {"train", "steps", "data", "io", "convert"}),
        ("data", {"classify", "predict", "train"}),  # the training data does not lean on the inference CLI
        ("images", {"classify", "data", "predict", "model"}),
    ],
)
def test_layers_stay_apart(module, must_not_import):
    assert not (_imports()[module] & must_not_import), _imports()[module]


def test_every_exported_name_resolves():
    for name in alexnet_jax.__all__:
        assert getattr(alexnet_jax, name) is not None, name
