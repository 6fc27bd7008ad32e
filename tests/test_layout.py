"""The package's layers: every import inside `alexnet_jax` runs downward, and the old module names still work.

`LAYERS` is the house plan (the package docstring draws it): a module may import from its
own subpackage and from the layers below its own, never from its layer's other units or
from above. Imports inside functions count too: a lazy import upward is still upward.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alexnet_jax"

# Lower first. A unit is a subpackage or a top-level module of alexnet_jax.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "files", "upstream"),
    ("host_memory", "models", "transforms"),
    ("archs", "steps", "weights"),
    ("inference", "distributed"),
    ("training",),
    ("lpips",),
    ("export",),
    ("cli",),
    ("__init__", "__main__", "_moved"),
)
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported alexnet_jax module, names) of every import in the file, at any depth."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([target] if target else []))
            if target == "alexnet_jax":  # from alexnet_jax import x: x may be a module
                for alias in node.names:
                    found.append((node.lineno, f"alexnet_jax.{alias.name}", []))
            elif target.startswith("alexnet_jax."):
                found.append((node.lineno, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("alexnet_jax."):
                    found.append((node.lineno, alias.name, []))
    return found


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYER), f"place these in LAYERS: {sorted(units - set(LAYER))}"


def _upward(imports: dict[str, list[tuple[int, str]]], modules: set[str]) -> list[str]:
    """'module:line imports target' for each import that does not run downward."""
    found = []
    for module, lines in imports.items():
        unit = _unit(module)
        for line, target in lines:
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]  # from alexnet_jax.models import layers
            other = _unit(target)
            if other != unit and not LAYER[other] < LAYER[unit] and unit not in ("__init__", "_moved"):
                found.append(f"{module}:{line} imports {target}")
    return found


def test_imports_run_downward():
    modules = _modules()
    imports = {m: [(line, target) for line, target, _ in _imports(m, p)] for m, p in modules.items()}
    upward = _upward(imports, set(modules))
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_the_layer_check_finds_upward_and_sideways_imports():
    modules = {"alexnet_jax.models.alexnet", "alexnet_jax.training.loop", "alexnet_jax.weights.convert"}
    imports = {
        "alexnet_jax.models.alexnet": [(3, "alexnet_jax.training.loop")],  # up
        "alexnet_jax.weights.convert": [(5, "alexnet_jax.models.alexnet")],  # down
        "alexnet_jax.training.loop": [(7, "alexnet_jax.weights.convert")],  # down
    }
    assert _upward(imports, modules) == ["alexnet_jax.models.alexnet:3 imports alexnet_jax.training.loop"]
    imports = {"alexnet_jax.inference.predict": [(1, "alexnet_jax.distributed.parallel")]}  # same layer, other unit
    assert _upward(imports, {"alexnet_jax.inference.predict", "alexnet_jax.distributed.parallel"})


def test_no_private_names_across_modules():
    modules = _modules()
    private = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from {target}"
        for module, path in modules.items()
        for line, target, names in _imports(module, path)
        for name in names
        if name.startswith("_") and target != module
    ]
    assert not private, "\n".join(private)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for _, t, _ in _imports(m, p) if t in modules} - {m, "alexnet_jax"} for m, p in modules.items()}
    graph.pop("alexnet_jax")
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_imports():
    # In a fresh interpreter, with the old names' warnings as errors: nothing in the package uses them.
    modules = [m for m in _modules() if not m.endswith(("coordinator_service", "__main__"))]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code, *modules], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("old", ["nnx_model", "train", "io", "convert", "towers", "data", "model"])
def test_old_module_names_work_with_one_line(old, recwarn):
    import alexnet_jax

    moved = importlib.import_module(f"alexnet_jax.{old}")
    names = [n for n in dir(moved) if not n.startswith("_")]
    assert names
    getattr(moved, names[0])
    [warning] = [w for w in recwarn if issubclass(w.category, FutureWarning)]
    assert f"alexnet_jax.{old} moved: import {names[0]} from alexnet_jax." in str(warning.message)
    assert "\n" not in str(warning.message)
    assert set(alexnet_jax.MOVED_MODULES) >= {old}


def test_old_import_forms():
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from alexnet_jax.nnx_model import AlexNet, to_variables\n"
        "from alexnet_jax import towers\n"
        "import alexnet_jax.train as train\n"
        "from alexnet_jax.models.nnx import AlexNet as New\n"
        "assert AlexNet is New and callable(to_variables) and callable(towers.make_tower_mesh)\n"
        "assert train.TrainConfig is __import__('alexnet_jax.training.config').training.config.TrainConfig\n"
        "import alexnet_jax.predict, alexnet_jax.preprocess\n"
        "import alexnet_jax as a; assert callable(a.predict) and callable(a.preprocess)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_exported_name_resolves():
    import alexnet_jax

    for name in alexnet_jax.__all__:
        assert getattr(alexnet_jax, name) is not None, name
