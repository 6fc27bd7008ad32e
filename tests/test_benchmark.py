"""The benchmark script runs end to end (a smoke test: it asserts structure, never a speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--batch-sizes", "1", "--repeats", "1",
         "--warmup", "0", "--image-size", "63", "--no-compile", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert run["batch"] == 1
    for work in ("infer", "train"):
        assert set(run[work]) == {"jax", "torch_eager"}
        assert all(v > 0 for v in run[work].values())
    assert results["conversion"]["weights_mb"] > 240  # the full 61M-parameter model in float32
    assert "| infer | 1 |" in done.stdout and "jax / torch eager" in done.stdout
