"""Per-layer activation and gradient scales of `AlexNet2012` under each initialization, at step 0 and after a few steps.

    python examples/make_digits_imagefolder.py --output digits256 --size 256
    python benchmarks/init_scales.py digits256/train --steps 8 --lr 0.01
    python benchmarks/init_scales.py digits256/train --steps 0 --conv1-std-on-normalized

For each initialization (`alexnet2012.INITS`) it prints one table per moment (step 0, then
after `--steps` SGD steps of the paper's recipe on batches of the folder's training crops):
per layer, the std of the layer's output before its ReLU over the batch (`act`), the spread
between images (the std over the batch, averaged over units: what carries information about the
input), the RMS of the weights (`w`) and of their gradient (`grad`), and the size of one
update relative to the weights, lr * grad / w. Then the training loss of each step and the
spread of the logits. `--input-scale` multiplies the normalized images, e.g. by 57 to feed
pixel units as the originals did (0-255 minus the mean; 255 x the ImageNet channel std is
about 57); `--conv1-std-on-normalized` undoes `alexnet2012.kernel_init`'s conversion of conv1's
std to pixel units, to show what the sources' numbers do when read as normalized-input units;
`--num-classes 1000` trains a 1000-way head on the 10 digit labels, as the original's head
would be. What it showed is in docs/alexnet2012.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from alexnet_jax.models.alexnet2012 import INIT_NAMES, LAYER_NAMES, PIXELS_PER_UNIT, AlexNet2012
from alexnet_jax.steps import create_train_state, init_params, make_optimizer, train_step
from alexnet_jax.training.recipe import PAPER_WEIGHT_DECAY, RECIPE_RULES
from alexnet_jax.transforms.augment import paper_train_transform


def load_batches(folder: Path, *, batch: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of `batch` random training crops (the paper's train transform) with their labels."""
    paths = sorted(folder.glob("*/*.png"))
    classes = sorted({p.parent.name for p in paths})
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        chosen = rng.choice(len(paths), batch, replace=False)
        images = np.stack([paper_train_transform(Image.open(paths[i]), 227, rng) for i in chosen])
        labels = np.asarray([classes.index(paths[i].parent.name) for i in chosen], np.int32)
        batches.append({"image": images, "label": labels, "mask": np.ones(batch, np.float32)})
    return batches


def layer_stats(model: AlexNet2012, params: dict, batch: dict[str, np.ndarray], lr: float) -> dict[str, dict]:
    """Per layer: output std, between-image spread, weight RMS, gradient RMS and lr * grad / w, dropout off."""

    def loss_fn(p, images, labels):
        logits, inter = model.apply({"params": p}, images, mutable=["intermediates"], capture_intermediates=True)
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return loss, inter["intermediates"]

    (_, inter), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch["image"], batch["label"])
    stats = {}
    for name in LAYER_NAMES:
        out = np.asarray(inter[name]["__call__"][0], np.float64)
        w = float(np.sqrt(np.mean(np.square(params[name]["kernel"]))))
        g = float(np.sqrt(np.mean(np.square(grads[name]["kernel"]))))
        stats[name] = {
            "act": out.std(),
            "spread": out.std(axis=0).mean(),
            "w": w,
            "grad": g,
            "update": lr * g / w,
        }
    return stats


def print_stats(title: str, stats: dict[str, dict]) -> None:
    print(f"\n{title}\n| layer | act std | between images | w rms | grad rms | lr*grad/w |")
    print("|---|---|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['act']:.3g} | {s['spread']:.3g} | {s['w']:.3g} | {s['grad']:.3g} | {s['update']:.3g} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", type=Path, help="an ImageFolder of 256x256 images (make_digits_imagefolder.py)")
    parser.add_argument("--inits", nargs="+", default=list(INIT_NAMES), choices=INIT_NAMES)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--input-scale", type=float, default=1.0)
    parser.add_argument(
        "--conv1-std-on-normalized",
        action="store_true",
        help="draw conv1 at the source's std on the normalized inputs (no pixel-unit conversion)",
    )
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = load_batches(args.train, batch=args.batch_size, count=args.steps + 1, seed=args.seed)
    for b in batches:
        b["image"] = b["image"] * np.float32(args.input_scale)
    probe = batches[0]
    for init in args.inits:
        model = AlexNet2012(num_classes=args.num_classes, initialization=init)
        params = init_params(model, seed=args.seed, image_size=227)
        if args.conv1_std_on_normalized:
            conv1 = params["features_0"]
            kernel = conv1["kernel"] / np.asarray(PIXELS_PER_UNIT, np.float32)[:, None]
            params = {**params, "features_0": {**conv1, "kernel": kernel}}
        print(f"\n## init={init} lr={args.lr} batch={args.batch_size} input x{args.input_scale}", end=" ")
        print(f"classes={args.num_classes}" + (" conv1-std-on-normalized" if args.conv1_std_on_normalized else ""))
        print_stats("step 0", layer_stats(model, params, probe, args.lr))
        tx = make_optimizer(args.lr, weight_decay=PAPER_WEIGHT_DECAY, rule=RECIPE_RULES["paper"])
        state = create_train_state(model, params, tx, seed=args.seed)
        losses = []
        for b in batches[1:]:
            state, metrics = train_step(state, b)
            losses.append(float(metrics["loss"]))
            print(f"step {len(losses)}: loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
        if not args.steps:
            logits = np.asarray(model.apply({"params": params}, probe["image"]))
            print(f"logits: spread between images {logits.std(axis=0).mean():.3g}")
            continue
        print_stats(f"after {args.steps} steps", layer_stats(model, state.params, probe, args.lr))
        print("training losses:", " ".join(f"{x:.3f}" for x in losses))
        logits = np.asarray(model.apply({"params": state.params}, probe["image"]))
        spread, size = logits.std(axis=0).mean(), np.abs(logits).mean()
        print(f"logits: spread between images {spread:.3g}, mean |logit| {size:.3g}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
