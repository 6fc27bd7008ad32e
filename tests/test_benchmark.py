"""The benchmark script runs end to end (a smoke test: it asserts structure, never a speed)."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, load_script, run_python

SCRIPT = REPO / "benchmarks" / "benchmark.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the script at its smallest (batch 1, 63x63, one timed call, no torch.compile),
    bf16 included: (process, JSON). One run for both smoke tests: each costs a full compile."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = run_python(
        [
            SCRIPT,
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--image-size",
            "63",
            "--no-compile",
            # XLA's convolution: the default "auto" would compile Winograd's (tested in
            # test_winograd.py) for three programs, a minute of a smoke test's time.
            "--conv-algorithm",
            "xla",
            "--output",
            out,
            "--bf16",
            "--peak-tflops",
            "1",
            "--steps-per-call",
            "2",
        ],
    )
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


@pytest.mark.slow
@pytest.mark.torch
def test_benchmark_smoke(smoke):
    done, results = smoke
    (run,) = results["runs"]
    assert run["batch"] == 1
    for work in ("infer", "train"):
        assert set(run[work]) == {"jax", "torch_eager"}
        assert all(v > 0 for v in run[work].values())
    assert results["conversion"]["weights_mb"] > 240  # the full 61M-parameter model in float32
    assert "| infer | 1 |" in done.stdout and "jax / torch eager" in done.stdout
    assert results["machine"]["device"]


@pytest.mark.slow
@pytest.mark.torch
def test_benchmark_bf16_smoke(smoke):
    done, results = smoke
    (run,) = results["runs"]
    assert set(run["train_bf16"]) == set(run["mfu_bf16"]) == {"jax", "torch_eager"}
    assert all(v > 0 for v in run["train_bf16"].values()) and all(v > 0 for v in run["mfu_bf16"].values())
    assert results["flops"]["train_per_image"] == 3 * results["flops"]["forward_per_image"]
    assert (results["machine"]["peak_bf16_tflops"], results["machine"]["peak_source"]) == (1.0, "--peak-tflops")
    assert results["settings"]["steps_per_call"] == 2
    assert "| bf16 train | 1 |" in done.stdout and "MFU jax" in done.stdout


def test_model_flops_match_torchvision(benchmark):
    # torchvision's card: 0.714 "GFLOPS" at 224, counting a multiply-add as one.
    assert benchmark.model_flops_per_image(224) == pytest.approx(2 * 0.714e9, rel=1e-3)
    assert benchmark.model_flops_per_image(63) < benchmark.model_flops_per_image(224)


def test_peak_is_known_only_by_exact_name(benchmark):
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", None) == (989.4, "table")
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == (500.0, "--peak-tflops")
    peak, why = benchmark.peak_tflops("NVIDIA H100 NVL", None)  # a different peak: no guess
    assert peak is None and "--peak-tflops" in why
