#!/usr/bin/env python
"""alexnet_jax against PyTorch (eager and torch.compile), in one process and one run.

    python benchmarks/benchmark.py                          # batch 1, 32, 128; float32
    python benchmarks/benchmark.py --batch-sizes 32 --output bench.json

Times, on the same weights and the same architecture: inference and one SGD training
step (momentum 0.9, weight decay, dropout on) in images/s, JAX's compile time, and the
conversion of the full 61M-parameter model (time and peak memory). Warm-up calls are
excluded; each number is the median of --repeats timed calls, the contenders
timed in turns so that a change in load hits them alike. The table gives JAX's
ratio to each torch mode: >1 means JAX is faster. Ratios are only meaningful within
one run (same machine, same load), which is why everything runs in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler, and minutes)")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats and --batch-sizes must be at least 1, --warmup at least 0")
    from alexnet_jax.model import MIN_SIZE

    if args.image_size < MIN_SIZE:
        p.error(f"--image-size must be at least {MIN_SIZE} (AlexNet's smallest input)")
    return args


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (a, b, c, a, b, c, ...).

    Taking turns spreads any change in the machine's load (another process, thermal
    throttling) over all contenders, so their ratios stay fair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _torch_runners(model_cls, state_dict, batch: int, size: int, compiled: bool):
    """(inference, train step) callables for torch eager or torch.compile, NCHW input."""
    import torch

    model = model_cls()
    model.load_state_dict(state_dict)
    runner = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def infer():
        model.eval()
        with torch.inference_mode():
            runner(x)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(runner(x), y).backward()
        opt.step()

    return infer, train


def _jax_runners(variables, batch: int, size: int):
    """(inference, train step, compile seconds) for alexnet_jax's default path, NHWC input."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import AlexNet
    from alexnet_jax.train import create_train_state, make_optimizer, train_step

    model = AlexNet()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
    data = {"image": x, "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32), "mask": jnp.ones((batch,), jnp.float32)}
    params = jax.device_put(variables["params"])
    forward = jax.jit(model.apply)

    start = time.perf_counter()
    forward_compiled = forward.lower({"params": params}, x).compile()
    state = create_train_state(model, params, make_optimizer(1e-3, weight_decay=1e-4), seed=0)
    train_compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def infer():
        forward_compiled({"params": params}, x).block_until_ready()

    holder = {"state": state}

    def train():
        # train_step donates the state: keep only the newest one.
        holder["state"], metrics = train_compiled(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return infer, train, compile_s


def _conversion(state_dict) -> dict[str, float]:
    """Time and peak Python-heap memory of torch_to_flax on the full model."""
    from alexnet_jax import torch_to_flax

    numpy_sd = {k: v.numpy() for k, v in state_dict.items()}
    tracemalloc.start()
    start = time.perf_counter()
    torch_to_flax(numpy_sd)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    weights_mb = sum(v.nbytes for v in numpy_sd.values()) / 1e6
    return {"seconds": seconds, "peak_mb": peak / 1e6, "weights_mb": weights_mb}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import jax
    import torch

    from alexnet_jax.reference import torch_alexnet_class

    model_cls, reference = torch_alexnet_class()
    torch.manual_seed(0)
    state_dict = model_cls().state_dict()
    from alexnet_jax import torch_to_flax

    variables = torch_to_flax(state_dict)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_reference": reference,
        },
        "settings": {"image_size": args.image_size, "repeats": args.repeats, "warmup": args.warmup, "dtype": "float32"},
        "conversion": _conversion(state_dict),
        "runs": [],
    }
    for batch in args.batch_sizes:
        print(f"batch {batch}: compiling ...", file=sys.stderr, flush=True)
        infer, train, compile_s = _jax_runners(variables, batch, args.image_size)
        infers, trains = {"jax": infer}, {"jax": train}
        for mode in modes:
            infers[f"torch_{mode}"], trains[f"torch_{mode}"] = _torch_runners(
                model_cls, state_dict, batch, args.image_size, mode == "compile"
            )
        row = {"batch": batch, "jax_compile_s": compile_s}
        for work, fns in (("infer", infers), ("train", trains)):
            print(f"batch {batch}: timing {work} ...", file=sys.stderr, flush=True)
            row[work] = {name: batch / s for name, s in _interleaved_medians(fns, args.repeats, args.warmup).items()}
        results["runs"].append(row)

    print(_table(results, modes))
    if args.output:
        from alexnet_jax.io import atomic_write_bytes

        atomic_write_bytes(args.output, (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.output}")
    return 0


def _table(results: dict, modes: list[str]) -> str:
    head = ["work", "batch", "jax img/s"] + [f"torch {m} img/s" for m in modes] + [f"jax / torch {m}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["runs"]:
        for work in ("infer", "train"):
            r = row[work]
            cells = [work, str(row["batch"]), f"{r['jax']:.1f}"]
            cells += [f"{r[f'torch_{m}']:.1f}" for m in modes]
            cells += [f"{r['jax'] / r[f'torch_{m}']:.2f}x" for m in modes]
            lines.append("| " + " | ".join(cells) + " |")
    conv = results["conversion"]
    compile_s = ", ".join(f"batch {r['batch']}: {r['jax_compile_s']:.1f} s" for r in results["runs"])
    lines.append("")
    lines.append(f"JAX compile (forward + train step): {compile_s}")
    lines.append(
        f"conversion of the full model ({conv['weights_mb']:.0f} MB of weights): "
        f"{conv['seconds']:.2f} s, peak {conv['peak_mb']:.0f} MB"
    )
    m = results["machine"]
    lines.append(f"{m['platform']}, {m['cpus']} CPUs, jax {m['jax']} ({m['jax_backend']}), torch {m['torch']} ({m['torch_threads']} threads)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
