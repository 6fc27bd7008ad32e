#!/usr/bin/env python
"""alexnet_jax against PyTorch (eager and torch.compile), in one process and one run.

    python benchmarks/benchmark.py                          # batch 1, 32, 128; float32 (+ bf16 on a GPU)
    python benchmarks/benchmark.py --batch-sizes 32 --output bench.json
    python benchmarks/benchmark.py --bf16 --peak-tflops 989.4   # bf16 on CPU too; MFU against this peak

Times, on the same weights and the same architecture: inference and one SGD training
step (momentum 0.9, weight decay, dropout on) in images/s, JAX's compile time, and the
conversion of the full 61M-parameter model (time and peak memory). Warm-up calls are
excluded; each number is the median of --repeats timed calls, the contenders
timed in turns so that a change in load hits them alike. The table gives JAX's
ratio to each torch mode: >1 means JAX is faster. Ratios are only meaningful within
one run (same machine, same load), which is why everything runs in one process.

On a GPU (JAX's default backend is not the CPU and torch sees CUDA) both run there,
float32 at full float32 precision in both (no TF32), and a bf16 training step is
timed too (or on CPU with --bf16): `AlexNet(dtype=bfloat16)` with float32 parameters
against torch AMP (autocast to bfloat16) with the model and input channels_last.
For bf16 it reports model FLOPs utilization: the training FLOP/s the model's conv
and dense layers need (counted from the architecture, not measured) over the
device's peak dense bf16 FLOP/s. A GPU runs asynchronously, so what a timed call
waits for matters: by default each step is waited for (its CPU launch work counts,
which eager torch feels most); --steps-per-call N waits once per N steps, timing
throughput with launches overlapping the device's work.
"""

from __future__ import annotations

import argparse
import contextlib
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

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, in TFLOP/s, from NVIDIA's datasheets,
# keyed by the exact name torch.cuda.get_device_name gives. Exact names, not substrings:
# an H100 NVL or H200 NVL has a different peak, and a wrong peak is worse than none.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.4,  # H200 SXM: the H100's compute with more memory
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}
# A training step is counted as 3 forwards (the forward, then gradients with respect to
# activations and to weights, each costing about one forward), the usual convention for
# MFU. It overcounts AlexNet by conv1's input gradient, which neither framework computes.
TRAIN_FORWARDS = 3


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from alexnet_jax.models.alexnet import MIN_SIZE
    from alexnet_jax.models.layers import CONV_ALGORITHMS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="steps run back to back in one timed call, waiting once at its end: on a GPU, 1 times a synchronous step "
        "(its CPU launch work included), more times throughput with launches overlapping the device's work",
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--conv-algorithm",
        choices=CONV_ALGORITHMS,
        default="auto",
        help="AlexNet's conv_algorithm for the JAX side; auto takes Winograd on a CPU in float32, where it pays "
        "(default %(default)s)",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler, and minutes)"
    )
    p.add_argument("--bf16", action="store_true", help="time the bf16 training step on CPU too (always on a GPU)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak dense bf16 TFLOP/s for MFU (default: from the table by device name)",
    )
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps_per_call < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats, --steps-per-call and --batch-sizes must be at least 1, --warmup at least 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be positive")
    if args.image_size < MIN_SIZE:
        p.error(f"--image-size must be at least {MIN_SIZE} (AlexNet's smallest input)")
    return args


def _interleaved_medians(
    fns: dict[str, Callable[[int], object]], repeats: int, warmup: int, steps: int = 1
) -> dict[str, float]:
    """Median seconds per step of each function, timed in turns (a, b, c, a, b, c, ...).

    `fn(steps)` runs `steps` steps back to back and waits for the last. Taking turns
    spreads any change in the machine's load (another process, thermal throttling)
    over all contenders, so their ratios stay fair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn(steps)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def model_flops_per_image(size: int, num_classes: int = 1000) -> int:
    """Forward FLOPs of one size x size image: 2 x the multiply-adds of the conv and dense layers.

    Read off `alexnet_jax.models.alexnet`'s layer table; biases, ReLUs, pools and the loss are
    left out (well under 1%). torchvision's model card gives 0.714 "GFLOPS" at 224:
    that counts a multiply-add as one, so this is twice it (1.43e9), the count that
    peak FLOP/s figures use.
    """
    from alexnet_jax.models.alexnet import CONV_LAYERS, HIDDEN, POOL_AFTER
    from alexnet_jax.models.layers import POOL_OUTPUT, POOL_STRIDE, POOL_WINDOW

    macs, side, channels = 0, size, 3
    for index, features, kernel, stride, pad in CONV_LAYERS:
        side = (side + 2 * pad - kernel) // stride + 1
        macs += side * side * features * kernel * kernel * channels
        channels = features
        if index in POOL_AFTER:
            side = (side - POOL_WINDOW) // POOL_STRIDE + 1
    for fan_in, fan_out in ((channels * POOL_OUTPUT**2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, num_classes)):
        macs += fan_in * fan_out
    return 2 * macs


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from); (None, why) when it is not known."""
    if override is not None:
        return override, "--peak-tflops"
    if device in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[device], "table"
    return None, f"no peak bf16 FLOP/s known for device {device!r}; pass --peak-tflops to get MFU"


def _torch_runners(model_cls, state_dict, batch: int, size: int, compiled: bool, device, bf16: bool = False):
    """(inference, train step) callables for torch eager or torch.compile on `device`.

    float32 with NCHW input, or with `bf16` the AMP recipe: autocast to bfloat16
    (parameters stay float32) and model and input channels_last, which lets cuDNN
    take its NHWC tensor-core kernels. `fn(steps)` runs `steps` calls and waits for
    the device to finish the last.
    """
    import torch

    model = model_cls()
    model.load_state_dict(state_dict)
    layout = torch.channels_last if bf16 else torch.contiguous_format
    model.to(device, memory_format=layout)
    runner = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size).to(device, memory_format=layout)
    y = torch.randint(0, 1000, (batch,)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    # CUDA runs asynchronously: without the wait we would time the launch, not the work.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def infer(steps: int) -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            for _ in range(steps):
                runner(x)
        sync()

    def train(steps: int) -> None:
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(runner(x), y)
            loss.backward()
            opt.step()
        sync()

    return infer, train


def _jax_setup(variables, batch: int, size: int, conv_algorithm: str, dtype=None):
    """(model, params, batch dict) for alexnet_jax on JAX's default device, NHWC input.

    `dtype` is the model's computation dtype (float32 by default); parameters and
    the optimizer stay float32 either way.
    """
    import jax
    import jax.numpy as jnp

    from alexnet_jax import AlexNet

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
    data = {
        "image": x,
        "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32),
        "mask": jnp.ones((batch,), jnp.float32),
    }
    model = AlexNet(dtype=dtype or jnp.float32, conv_algorithm=conv_algorithm)
    return model, jax.device_put(variables["params"]), data


def _jax_infer(model, params, data):
    """(inference callable, compile seconds)."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, data["image"]).compile()
    compile_s = time.perf_counter() - start

    def infer(steps: int) -> None:
        for _ in range(steps):
            logits = compiled({"params": params}, data["image"])
        logits.block_until_ready()

    return infer, compile_s


def _jax_train(model, params, data):
    """(train-step callable, compile seconds): one SGD step with momentum, weight decay, dropout on."""
    import jax

    from alexnet_jax.steps import create_train_state, make_optimizer, train_step

    start = time.perf_counter()
    state = create_train_state(model, params, make_optimizer(1e-3, weight_decay=1e-4), seed=0)
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def train(steps: int) -> None:
        for _ in range(steps):
            # train_step donates the state: keep only the newest one.
            holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return train, compile_s


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


def _accelerator() -> bool:
    """True when both JAX and torch run on a GPU, False when both run on the CPU; exits when they disagree."""
    import jax
    import torch

    jax_gpu, torch_gpu = jax.default_backend() != "cpu", torch.cuda.is_available()
    if jax_gpu != torch_gpu:
        sys.exit(
            f"JAX runs on {jax.default_backend()} but torch.cuda.is_available() is {torch_gpu}: the comparison "
            "would pit a GPU against a CPU; install CUDA builds of both, or hide the GPU from both "
            "(JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=)"
        )
    return jax_gpu


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # torch shares the GPU with JAX in this process: JAX must not take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Before JAX or torch start threads: glibc keeps freed host memory for the whole
    # process (alexnet_jax/host_memory.py), so both frameworks run under the same settings.
    from alexnet_jax import keep_freed_memory

    host_memory = keep_freed_memory()

    import jax
    import jax.numpy as jnp
    import torch

    from alexnet_jax.weights.reference import torch_alexnet_class

    accelerator = _accelerator()
    bf16 = accelerator or args.bf16
    device = torch.device("cuda" if accelerator else "cpu")
    if accelerator:
        # float32 means float32 on both sides: torch's cuDNN takes TF32 for float32
        # convolutions by default, and JAX takes it for float32 matmuls and convolutions
        # unless asked for "highest" (below). bf16 is the fast mode, timed separately.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # torch's conv autotuning, as XLA autotunes its own
    # Traced under "highest", the float32 JAX programs keep float32 precision on the GPU;
    # on CPU the default is float32 already, and the CPU path stays as it was.
    float32_precision = (lambda: jax.default_matmul_precision("highest")) if accelerator else contextlib.nullcontext
    device_name = torch.cuda.get_device_name(device) if accelerator else jax.devices()[0].device_kind
    peak, peak_source = peak_tflops(device_name, args.peak_tflops)

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
            "jax_device_kind": jax.devices()[0].device_kind,
            "device": device_name,
            "accelerator": accelerator,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "torch_threads": torch.get_num_threads(),
            "torch_reference": reference,
            "host_memory": host_memory,
        },
        "settings": {
            "image_size": args.image_size,
            "conv_algorithm": args.conv_algorithm,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "steps_per_call": args.steps_per_call,
            "dtype": "float32",
            "bf16": bf16,
            "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch_cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "conversion": _conversion(state_dict),
        "runs": [],
    }
    if bf16:
        forward = model_flops_per_image(args.image_size)
        results["flops"] = {"forward_per_image": forward, "train_per_image": TRAIN_FORWARDS * forward}
        results["machine"]["peak_bf16_tflops"] = peak
        results["machine"]["peak_source"] = peak_source
    for batch in args.batch_sizes:
        if bf16 and not args.no_compile:
            # bf16 adds a third compiled graph per batch; three batch sizes could then pass
            # dynamo's recompile limit, past which it runs eager without a word. So each
            # batch compiles from scratch for its own shapes, as JAX does.
            torch._dynamo.reset()
        print(f"batch {batch}: compiling ...", file=sys.stderr, flush=True)
        with float32_precision():
            setup = _jax_setup(variables, batch, args.image_size, args.conv_algorithm)
            (infer, infer_s), (train, train_s) = _jax_infer(*setup), _jax_train(*setup)
        infers, trains = {"jax": infer}, {"jax": train}
        for mode in modes:
            infers[f"torch_{mode}"], trains[f"torch_{mode}"] = _torch_runners(
                model_cls, state_dict, batch, args.image_size, mode == "compile", device
            )
        row = {"batch": batch, "jax_compile_s": infer_s + train_s}
        timed = [("infer", infers), ("train", trains)]
        if bf16:
            train_bf16, row["jax_bf16_compile_s"] = _jax_train(
                *_jax_setup(variables, batch, args.image_size, args.conv_algorithm, jnp.bfloat16)
            )
            trains_bf16 = {"jax": train_bf16}
            for mode in modes:
                _, trains_bf16[f"torch_{mode}"] = _torch_runners(
                    model_cls, state_dict, batch, args.image_size, mode == "compile", device, bf16=True
                )
            timed.append(("train_bf16", trains_bf16))
        for work, fns in timed:
            print(f"batch {batch}: timing {work} ...", file=sys.stderr, flush=True)
            row[work] = {
                name: batch / s
                for name, s in _interleaved_medians(fns, args.repeats, args.warmup, args.steps_per_call).items()
            }
        if bf16 and peak is not None:
            row["mfu_bf16"] = {
                name: v * results["flops"]["train_per_image"] / (peak * 1e12) for name, v in row["train_bf16"].items()
            }
        results["runs"].append(row)
        # Written after every batch: a run cut short (a time limit) keeps what it finished.
        _write(args.output, results)

    print(_table(results, modes))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _write(path: Path | None, results: dict) -> None:
    if path is None:
        return
    from alexnet_jax.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())


def _speed_cells(r: dict[str, float], modes: list[str]) -> list[str]:
    """Images/s of jax and each torch mode, then jax's ratio to each."""
    return (
        [f"{r['jax']:.1f}"]
        + [f"{r[f'torch_{m}']:.1f}" for m in modes]
        + [f"{r['jax'] / r[f'torch_{m}']:.2f}x" for m in modes]
    )


def _table(results: dict, modes: list[str]) -> str:
    speed_head = ["jax img/s"] + [f"torch {m} img/s" for m in modes] + [f"jax / torch {m}" for m in modes]
    head = ["work", "batch"] + speed_head
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["runs"]:
        for work in ("infer", "train"):
            lines.append("| " + " | ".join([work, str(row["batch"])] + _speed_cells(row[work], modes)) + " |")
    m = results["machine"]
    if results["settings"]["bf16"]:
        mfu = m["peak_bf16_tflops"] is not None
        head = (
            ["bf16 train", "batch"]
            + speed_head
            + (["MFU jax"] + [f"MFU torch {mode}" for mode in modes] if mfu else [])
        )
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in results["runs"]:
            cells = ["bf16 train", str(row["batch"])] + _speed_cells(row["train_bf16"], modes)
            cells += [f"{100 * v:.1f}%" for v in row["mfu_bf16"].values()] if mfu else []
            lines.append("| " + " | ".join(cells) + " |")
        flops = results["flops"]
        lines.append("")
        lines.append(
            f"model FLOPs: {flops['forward_per_image'] / 1e9:.3f} GFLOP forward per image, "
            f"a training step {TRAIN_FORWARDS}x that; "
            + (
                f"peak {m['peak_bf16_tflops']:g} TFLOP/s bf16 ({m['peak_source']})"
                if mfu
                else f"MFU omitted: {m['peak_source']}"
            )
        )
    conv = results["conversion"]
    compile_s = ", ".join(f"batch {r['batch']}: {r['jax_compile_s']:.1f} s" for r in results["runs"])
    lines.append("")
    lines.append(f"JAX compile (forward + train step): {compile_s}")
    lines.append(
        f"conversion of the full model ({conv['weights_mb']:.0f} MB of weights): "
        f"{conv['seconds']:.2f} s, peak {conv['peak_mb']:.0f} MB"
    )
    steps = results["settings"]["steps_per_call"]
    if steps > 1:
        lines.append(f"each timed call: {steps} steps back to back, one wait at the end")
    gpu = f", {m['device']}" if m["accelerator"] else ""
    lines.append(
        f"{m['platform']}, {m['cpus']} CPUs{gpu}, jax {m['jax']} ({m['jax_backend']}), "
        f"torch {m['torch']} ({m['torch_threads']} threads)"
    )
    lines.append(f"glibc keeps freed host memory (alexnet_jax.host_memory): {m['host_memory']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
