"""Host memory: kept only when asked for (keep_freed_memory() or GLIBC_TUNABLES), never by an import.

Each check runs in a fresh process: the settings only reach threads that allocate after
them, and the test session's own JAX backend started long ago.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap

import pytest

from helpers import run_python

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)

# AlexNet's forward at batch 8 with the Winograd layers (a ~63 MB scratch, mapped afresh
# per call by glibc's default), called repeatedly; reports the minor page faults of each call.
# KEEP=1 calls keep_freed_memory() first, as the entry scripts do.
CHILD = textwrap.dedent(
    """
    import json, os, resource
    import alexnet_jax
    status = alexnet_jax.keep_freed_memory() if os.environ["KEEP"] == "1" else "not called"
    import jax, jax.numpy as jnp

    model = alexnet_jax.AlexNet(conv_algorithm="winograd")
    x = jnp.ones((8, 224, 224, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    forward = jax.jit(model.apply)
    temp = forward.lower(variables, x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward(variables, x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"status": status, "temp_pages": temp / 4096, "faults": faults}))
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
    allocator = [k for k in os.environ if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")]
    proc = run_python(
        ["-c", code], env={"JAX_PLATFORMS": "cpu", "ALEXNET_JAX_KEEP_HOST_MEMORY": "1", **env}, drop_env=allocator
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@glibc_linux
@pytest.mark.skipif(_thp_always(), reason="with huge pages everywhere the default faults per 2 MB")
@pytest.mark.slow
def test_scratch_memory_is_reused_only_when_asked_for():
    from alexnet_jax.host_memory import TUNABLES

    kept, _ = _run(CHILD, KEEP="1")
    tunables, _ = _run(CHILD, KEEP="0", GLIBC_TUNABLES=TUNABLES)
    default, _ = _run(CHILD, KEEP="0")
    opted_out, _ = _run(CHILD, KEEP="1", ALEXNET_JAX_KEEP_HOST_MEMORY="0")
    assert kept["status"] == "applied"
    assert opted_out["status"].startswith("off")
    pages = kept["temp_pages"]
    assert pages * 4096 > 32 * 2**20  # above glibc's largest mmap threshold: mapped per call by default
    # glibc's default (an import alone, or the opt-out) maps the scratch afresh on every
    # call: a fault per page, every time.
    for run in (default, opted_out):
        assert min(run["faults"][2:]) > 0.9 * pages, run["faults"]
    # Kept, by the call or by the documented GLIBC_TUNABLES line: after the first calls
    # the same pages serve every call.
    for run in (kept, tunables):
        assert max(run["faults"][2:]) < 0.01 * pages, run["faults"]


@glibc_linux
@pytest.mark.slow
def test_calling_after_jax_started_its_backend_warns():
    code = (
        "import jax, json; jax.devices()\nimport alexnet_jax\n"
        "print(json.dumps({'status': alexnet_jax.keep_freed_memory()}))"
    )
    result, stderr = _run(code)
    assert result["status"].startswith("applied late")
    assert "call it before running JAX code" in stderr


@glibc_linux
def test_import_alone_changes_nothing_process_wide():
    # The measurement: with the settings, freed numpy memory stayed resident (986 MB
    # of 800 MB freed); without, it goes back. Also: no warning even after JAX started (so
    # `python -W error` imports fine), the umask, socket timeout and matplotlib backend untouched.
    code = textwrap.dedent(
        """
        import json, os, socket, sys
        import jax; jax.devices()
        def umask():
            for line in open("/proc/self/status"):
                if line.startswith("Umask:"):
                    return line.split()[1]
        before = (umask(), socket.getdefaulttimeout())
        import alexnet_jax, alexnet_jax.training.loop, alexnet_jax.training.pipeline, alexnet_jax.training.checkpoint
        import alexnet_jax.distributed.parallel, alexnet_jax.inference.classify, alexnet_jax.inference.predict
        import alexnet_jax.inference.pictures
        import numpy as np
        a = np.ones(800 * 2**20, np.uint8); del a
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        print(json.dumps({"rss_mb": rss / 2**20, "same": before == (umask(), socket.getdefaulttimeout()),
                          "matplotlib": "matplotlib" in sys.modules}))
        """
    )
    result, stderr = _run(code, PYTHONWARNINGS="error")
    assert result["same"] and not result["matplotlib"], result
    assert result["rss_mb"] < 600, result  # JAX and torch-free imports take ~300 MB; the freed 800 MB went back


def test_opting_out_leaves_malloc_alone(monkeypatch):
    from alexnet_jax.host_memory import ENV, keep_freed_memory

    for value in ("0", "off"):
        monkeypatch.setenv(ENV, value)
        assert keep_freed_memory() == f"off ({ENV}={value})"
