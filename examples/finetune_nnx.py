"""Fine-tune the Flax NNX AlexNet on scikit-learn's handwritten digits (10 classes), and report validation accuracy.

    python examples/finetune_nnx.py --weights alexnet.msgpack --output digits.msgpack
    python examples/finetune_nnx.py --random-init --steps 300 --output digits.msgpack

The 8x8 grey digits are scaled to --image-size (bilinear), repeated to RGB and normalized
with ImageNet's mean and deviation; a stratified fifth of them (by --seed) is held out.
The model is `alexnet_jax.models.nnx.AlexNet`, loaded by `AlexNet.from_variables` (its head
replaced by a fresh 10-class one) or freshly initialized; it trains by SGD with momentum 0.9
through `nnx_model.train_step`. --output writes the result with `alexnet_jax.save_variables`,
loadable by the linen `AlexNet(num_classes=10)`. Exit status: 0 trained; 1 a missing or bad
weights file, an output folder that does not exist, or scikit-learn missing; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from alexnet_jax import MEAN_RGB, STDDEV_RGB, keep_freed_memory, load_variables, save_variables
from alexnet_jax.models.alexnet import MIN_SIZE
from alexnet_jax.models.layers import CONV_ALGORITHMS

NUM_CLASSES = 10


def digits(size: int, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's digits as normalized RGB images, split per class.

    **Returns:** train images (N, size, size, 3) float32, train labels int32 (N,), and
    the same for validation.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    # Values 0..16 as 0..1, scaled up in float ("F" mode) so no rounding to 8 bits.
    grey = np.stack(
        [
            np.asarray(Image.fromarray(im / 16, "F").resize((size, size), Image.BILINEAR))
            for im in data.images.astype(np.float32)
        ]
    )
    images = ((grey[..., None] - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)).astype(np.float32)
    labels = data.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    for label in range(NUM_CLASSES):
        indices = rng.permutation(np.flatnonzero(labels == label))
        val[indices[: round(len(indices) * val_fraction)]] = True
    return images[~val], labels[~val], images[val], labels[val]


def batches(n: int, batch_size: int, seed: int):
    """Index arrays of `batch_size`, through one shuffle of range(n) after another (never a short batch)."""
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--weights", type=Path, help="variables file to start from (alexnet-jax convert's output)")
    start.add_argument("--random-init", action="store_true", help="start from freshly initialized weights")
    parser.add_argument("--steps", type=int, default=300, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=64, help="default %(default)s")
    parser.add_argument("--image-size", type=int, default=64, help=f"at least {MIN_SIZE} (default %(default)s)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, momentum 0.9 (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the split, the head, the batches, dropout")
    parser.add_argument(
        "--conv-algorithm",
        choices=CONV_ALGORITHMS,
        default="xla",
        help="xla compiles fastest; winograd/auto: faster CPU steps, seconds more to compile",
    )
    parser.add_argument("--output", type=Path, help="where to save the fine-tuned variables (msgpack or .safetensors)")
    args = parser.parse_args(argv)
    if args.image_size < MIN_SIZE:
        parser.error(f"--image-size must be at least {MIN_SIZE} (AlexNet's smallest input), got {args.image_size}")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is not None and not args.output.parent.is_dir():
        print(f"error: {args.output.parent}: no such folder for --output", file=sys.stderr)
        return 1
    try:
        variables = load_variables(args.weights) if args.weights else None
        train_x, train_y, val_x, val_y = digits(args.image_size, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e}; this example needs scikit-learn: pip install scikit-learn", file=sys.stderr)
        return 1

    import optax
    from flax import nnx
    from tqdm import tqdm

    from alexnet_jax.models.nnx import AlexNet, eval_step, to_variables, train_step

    start = time.perf_counter()
    rngs = nnx.Rngs(params=args.seed, dropout=args.seed)
    if variables is None:
        # Jitted: drawing the 61M numbers op by op is slower (benchmarks/RESULTS.md).
        model = nnx.jit(lambda rngs: AlexNet(NUM_CLASSES, conv_algorithm=args.conv_algorithm, rngs=rngs))(rngs)
    else:
        model = AlexNet.from_variables(variables, conv_algorithm=args.conv_algorithm, rngs=rngs)
        model.replace_head(NUM_CLASSES, rngs=rngs)
    optimizer = nnx.Optimizer(model, optax.sgd(args.lr, momentum=0.9), wrt=nnx.Param)
    model.train()
    order = batches(len(train_y), args.batch_size, args.seed)
    progress = tqdm(order, total=args.steps, desc="fine-tuning", unit="step")
    for step, index in enumerate(progress, start=1):
        loss = train_step(model, optimizer, train_x[index], train_y[index])
        if step % 10 == 0 or step == args.steps:
            progress.set_postfix(loss=f"{float(loss):.4f}")
        if step == args.steps:
            break
    progress.close()
    model.eval()
    correct = 0
    for i in range(0, len(val_y), args.batch_size):  # the last batch padded to the same shape, not compiled again
        index = np.minimum(np.arange(i, i + args.batch_size), len(val_y) - 1)
        correct += int(np.sum(np.asarray(eval_step(model, val_x[index], val_y[index]))[: len(val_y) - i]))
    seconds = time.perf_counter() - start
    print(
        f"validation accuracy {correct / len(val_y):.4f} ({correct}/{len(val_y)}) "
        f"after {args.steps} steps ({seconds:.1f} s in all)"
    )
    if args.output is not None:
        print(f"saved {save_variables(args.output, to_variables(model))}")
    return 0


if __name__ == "__main__":
    # An entry script may make process-wide choices; the library never does. Before JAX
    # starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    sys.exit(main())
