"""glibc keeps the memory XLA's CPU programs free, so a second call does not page-fault its scratch again.

Each check runs in a fresh process: the settings only reach threads that allocate after
them, and the test session's own JAX backend started long ago.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)

# AlexNet's forward at batch 8 (a ~63 MB scratch, mapped afresh per call by glibc's
# default), called repeatedly; reports the minor page faults of each call and the status.
CHILD = textwrap.dedent(
    """
    import json, resource
    import alexnet_jax
    import jax, jax.numpy as jnp

    model = alexnet_jax.AlexNet()
    x = jnp.ones((8, 224, 224, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    forward = jax.jit(model.apply)
    temp = forward.lower(variables, x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward(variables, x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"status": alexnet_jax.HOST_MEMORY, "temp_pages": temp / 4096, "faults": faults}))
    """
)


def _thp_always() -> bool:
    """Transparent huge pages for every mapping: faults come per 2 MB, not per page."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def _run(code: str, **env: str) -> tuple[dict, str]:
    # The user's own allocator settings would decide the outcome instead of the module's.
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "JAX_PLATFORMS": "cpu", "ALEXNET_JAX_KEEP_HOST_MEMORY": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@glibc_linux
@pytest.mark.skipif(_thp_always(), reason="with huge pages everywhere the default faults per 2 MB")
def test_scratch_memory_is_reused_not_faulted_again():
    kept, _ = _run(CHILD)
    default, _ = _run(CHILD, ALEXNET_JAX_KEEP_HOST_MEMORY="0")
    assert kept["status"] == "applied"
    assert default["status"].startswith("off")
    pages = kept["temp_pages"]
    assert pages * 4096 > 32 * 2**20  # above glibc's largest mmap threshold: mapped per call by default
    # glibc's default maps the scratch afresh on every call: a fault per page, every time.
    assert min(default["faults"][2:]) > 0.9 * pages, default["faults"]
    # Kept: after the first calls the same pages serve every call.
    assert max(kept["faults"][2:]) < 0.01 * pages, kept["faults"]


@glibc_linux
def test_importing_after_jax_started_its_backend_warns():
    code = "import jax, json; jax.devices()\nimport alexnet_jax\nprint(json.dumps({'status': alexnet_jax.HOST_MEMORY}))"
    result, stderr = _run(code)
    assert result["status"].startswith("applied late")
    assert "import alexnet_jax before running JAX code" in stderr


def test_opting_out_leaves_malloc_alone(monkeypatch):
    from alexnet_jax.host_memory import ENV, keep_freed_memory

    for value in ("0", "off"):
        monkeypatch.setenv(ENV, value)
        assert keep_freed_memory() == f"off ({ENV}={value})"
