#!/usr/bin/env python
"""Compile times of AlexNet's forward and gradient per conv algorithm, and what host variables cost a call.

    python benchmarks/compile_times.py                  # batch 8, 224x224, xla and winograd
    python benchmarks/compile_times.py --output compile.json

Each program is compiled in a fresh process, so no compilation cache or earlier trace
helps it (JAX's persistent cache is off unless you set it). The gradient is of a summed
cross-entropy with respect to every parameter, as a training step needs. The last
line times a batch-1 forward given the variables as numpy arrays (copied to the device
at every call) against the same variables already on the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
from alexnet_jax import keep_freed_memory
keep_freed_memory()
import jax, jax.numpy as jnp
from alexnet_jax import AlexNet

algorithm, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = AlexNet(conv_algorithm=algorithm)
x = jnp.zeros((batch, size, size, 3))
params = jax.eval_shape(model.init, jax.random.key(0), x[:1])

def loss(variables, x):
    return -jax.nn.log_softmax(model.apply(variables, x))[:, 0].sum()

out = {}
for name, fn in (("forward_s", model.apply), ("gradient_s", jax.grad(loss))):
    start = time.perf_counter()
    jax.jit(fn).lower(params, x).compile()
    out[name] = time.perf_counter() - start
print(json.dumps(out))
"""

TRANSFER = """
import json, time
from alexnet_jax import keep_freed_memory
keep_freed_memory()
import jax, jax.numpy as jnp, numpy as np
from alexnet_jax import AlexNet

model = AlexNet()
x = jnp.zeros((1, 224, 224, 3))
host = jax.device_get(jax.jit(model.init)(jax.random.key(0), x))
device = jax.device_put(host)
forward = jax.jit(model.apply)
out = {}
for name, variables in (("numpy_ms", host), ("device_ms", device)):
    forward(variables, x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        forward(variables, x).block_until_ready()
        times.append(time.perf_counter() - start)
    out[name] = 1e3 * sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def _child(code: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"error: a child process failed: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--algorithms", nargs="+", choices=("xla", "winograd"), default=["xla", "winograd"])
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.image_size < 63:
        p.error("--batch must be at least 1 and --image-size at least 63")
    started = time.perf_counter()
    results = {"batch": args.batch, "image_size": args.image_size, "compile": {}}
    for algorithm in args.algorithms:
        times = _child(CHILD, algorithm, str(args.batch), str(args.image_size))
        results["compile"][algorithm] = times
        print(f"{algorithm:>8}: forward {times['forward_s']:.1f} s, gradient {times['gradient_s']:.1f} s to compile")
    results["batch1_forward"] = _child(TRANSFER)
    t = results["batch1_forward"]
    print(f"batch-1 forward: {t['numpy_ms']:.0f} ms with numpy variables, {t['device_ms']:.0f} ms with device arrays")
    if args.output:
        from alexnet_jax.files import atomic_write_bytes

        atomic_write_bytes(args.output, (json.dumps(results, indent=2) + "\n").encode())
    print(f"({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
