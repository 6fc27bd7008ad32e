"""Every private JAX, jaxlib and Grain name the package relies on (`alexnet_jax.upstream`) still exists.

When an upgrade moves one, the test of that name fails and says what it was for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from alexnet_jax import upstream


@pytest.mark.parametrize("name", sorted(upstream.PRIVATE_NAMES))
def test_private_name_resolves(name):
    if name.endswith("._unlink_on_del"):  # an instance attribute: set on each array Grain will unlink
        cls = upstream.lookup(name.rpartition(".")[0])
        source = Path(__import__(cls.__module__, fromlist=["_"]).__file__).read_text()
        assert "_unlink_on_del" in source, f"{name} is gone; it was for {upstream.PRIVATE_NAMES[name]}"
        return
    upstream.lookup(name)


def test_lookup_names_what_broke():
    with pytest.raises(upstream.UpstreamChanged, match=r"jax._src.nothing:here is gone .* it was for this package"):
        upstream.lookup("jax._src.nothing:here")


def test_backends_initialized_answers():
    assert upstream.jax_backends_initialized() in (True, False)


def test_distributed_state_before_initialize():
    with pytest.raises(RuntimeError, match="not initialized"):
        upstream.distributed_state()


def test_detect_cluster_keeps_given_values():
    assert upstream.detect_cluster("127.0.0.1:1234", 2, 1, 5) == ("127.0.0.1:1234", 2, 1)


def test_only_upstream_names_private_modules():
    package = Path(upstream.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "upstream.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            offenders += [f"{path.name}: {m}" for m in modules if "._src" in m or m.startswith("jaxlib")]
    assert not offenders, offenders
