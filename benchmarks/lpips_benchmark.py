#!/usr/bin/env python
"""LPIPS (AlexNet) in JAX against the lpips package in torch, in one process and one run.

    python benchmarks/lpips_benchmark.py                          # 256x256 pairs, batch 32
    python benchmarks/lpips_benchmark.py --output lpips_bench.json

Pairs/s of the distance, and of the distance with its gradient with respect to the
first image (LPIPS as a training loss), for `alexnet_jax.lpips.distance` under jit and
for `lpips.LPIPS(net="alex")` in eager torch, on the same weights: a seeded torchvision
AlexNet trunk, converted by our converter and copied into lpips, and lpips's v0.1
linear weights. Each number is the median of --repeats timed calls, the two timed in
turns (benchmark.py's `_interleaved_medians`); warm-up calls and JAX's compilation are
left out (compile time is reported apart). Ratios are JAX / torch: >1 means JAX is
faster, and mean something only within one run. The run also reports the largest
relative difference between the two sides' distances, as a check that both computed
the same thing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from alexnet_jax.lpips import DEFAULT_VERSION, MIN_SIZE, VERSIONS
    from alexnet_jax.models.layers import CONV_ALGORITHMS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="pairs per call (default %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--version", choices=VERSIONS, default=DEFAULT_VERSION)
    p.add_argument(
        "--conv-algorithm",
        choices=CONV_ALGORITHMS,
        default="xla",
        help="the JAX trunk's conv_algorithm; auto takes Winograd on a CPU (default %(default)s, lpips.distance's)",
    )
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be at least 1, --warmup at least 0")
    if args.size < MIN_SIZE:
        p.error(f"--size must be at least {MIN_SIZE} (LPIPS's smallest input with AlexNet)")
    return args


def _import_lpips():
    """The lpips package, which imports torchvision: imported first as tests/conftest.py does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torchvision_import import import_torchvision

    import_torchvision()
    return importlib.import_module("lpips")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares a GPU with JAX here
    # Before JAX or torch start threads, so both run under the same allocator settings.
    from alexnet_jax import keep_freed_memory

    host_memory = keep_freed_memory()
    import jax
    import jax.numpy as jnp
    import torch

    from alexnet_jax import lpips, torch_to_flax
    from alexnet_jax.weights.reference import torch_alexnet_class

    _import_lpips()  # torchvision and lpips importable before lpips.torch_reference
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark import _accelerator, _interleaved_medians

    accelerator = _accelerator()
    device = torch.device("cuda" if accelerator else "cpu")
    if accelerator:  # float32 on both sides, as benchmark.py times it
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
    sync = torch.cuda.synchronize if accelerator else (lambda: None)

    model_cls, reference = torch_alexnet_class()
    torch.manual_seed(0)
    state_dict = model_cls().state_dict()
    params = lpips.load(torch_to_flax(state_dict), args.version)
    model = lpips.torch_reference(state_dict, args.version).to(device)

    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.2, x0.shape), -1, 1).astype(np.float32)
    j0, j1 = jnp.asarray(x0), jnp.asarray(x1)
    t0, t1 = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device) for x in (x0, x1))

    def loss(a, b, p):
        return lpips.distance(p, a, b, conv_algorithm=args.conv_algorithm).sum()

    start = time.perf_counter()
    jax_forward = jax.jit(lambda a, b, p: lpips.distance(p, a, b, conv_algorithm=args.conv_algorithm))
    jax_forward = jax_forward.lower(j0, j1, params).compile()
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    jax_grad = jax.jit(jax.value_and_grad(loss)).lower(j0, j1, params).compile()
    grad_s = time.perf_counter() - start

    def jax_forward_fn(steps: int) -> None:
        for _ in range(steps):
            out = jax_forward(j0, j1, params)
        out.block_until_ready()

    def jax_grad_fn(steps: int) -> None:
        for _ in range(steps):
            out = jax_grad(j0, j1, params)
        jax.block_until_ready(out)

    def torch_forward_fn(steps: int) -> None:
        with torch.inference_mode():
            for _ in range(steps):
                model(t0, t1)
        sync()

    def torch_grad_fn(steps: int) -> None:
        for _ in range(steps):
            a = t0.detach().requires_grad_()
            torch.autograd.grad(model(a, t1).sum(), a)
        sync()

    with torch.inference_mode():
        want = model(t0, t1).reshape(-1).cpu().numpy()
    got = np.asarray(jax_forward(j0, j1, params))
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "lpips": importlib.metadata.version("lpips"),
            "torch_reference": reference,
            "host_memory": host_memory,
        },
        "settings": {
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "version": args.version,
            "conv_algorithm": args.conv_algorithm,
        },
        "jax_compile_s": {"forward": forward_s, "grad": grad_s},
        "max_rel_diff": float(np.max(np.abs(got - want) / np.abs(want))),
        "pairs_per_s": {},
    }
    for work, fns in (
        ("forward", {"jax": jax_forward_fn, "torch": torch_forward_fn}),
        ("grad", {"jax": jax_grad_fn, "torch": torch_grad_fn}),
    ):
        print(f"timing {work} ...", file=sys.stderr, flush=True)
        seconds = _interleaved_medians(fns, args.repeats, args.warmup)
        results["pairs_per_s"][work] = {name: args.batch / s for name, s in seconds.items()}
    if args.output:
        from alexnet_jax.files import atomic_write_bytes

        atomic_write_bytes(args.output, (json.dumps(results, indent=2) + "\n").encode())
    print(_table(results))
    return 0


def _table(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = ["| work | pairs | size | jax pairs/s | torch (lpips) pairs/s | jax / torch |", "|---|---|---|---|---|---|"]
    for work, r in results["pairs_per_s"].items():
        lines.append(
            f"| {work} | {s['batch']} | {s['size']}x{s['size']} | {r['jax']:.1f} | {r['torch']:.1f} | "
            f"{r['jax'] / r['torch']:.2f}x |"
        )
    compile_s = results["jax_compile_s"]
    lines += [
        "",
        f"LPIPS v{s['version']}, JAX conv_algorithm={s['conv_algorithm']}; grad = distance and its gradient "
        f"with respect to the first image",
        f"JAX compile: forward {compile_s['forward']:.1f} s, grad {compile_s['grad']:.1f} s; "
        f"largest relative difference of the distances: {results['max_rel_diff']:.1e}",
        f"{m['platform']}, {m['cpus']} CPUs, jax {m['jax']} ({m['jax_backend']}), torch {m['torch']} "
        f"({m['torch_threads']} threads), lpips {m['lpips']}; host memory kept: {m['host_memory']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
