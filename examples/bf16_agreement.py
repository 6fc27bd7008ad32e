"""How often bfloat16 compute (float32 parameters) agrees with float32 on top-1 and top-5.

    python examples/bf16_agreement.py --weights alexnet.msgpack [IMAGE_OR_DIR ...]
    python examples/bf16_agreement.py --seed 0          # no weights file: needs torch

Images: the four photos shipped in alexnet_jax/assets/samples, plus any files and folders
given. Without --weights, the weights are torchvision's random initialization under
--seed (torch's default init, as `torchvision.models.alexnet()` makes them): their
logits are nearly flat, so top-1 there is decided by tiny margins and agreement is a
pessimistic stand-in for the trained weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alexnet_jax import keep_freed_memory, load_variables, torch_to_flax
from alexnet_jax.inference.classify import find_images
from alexnet_jax.inference.predict import dtype_agreement
from alexnet_jax.inference.verify import sample_images
from alexnet_jax.transforms.images import ImageReadError, load_image


def seeded_variables(seed: int):
    """torchvision's AlexNet initialized under `seed`, converted (torch's default init, not Flax's)."""
    import torch

    from alexnet_jax.weights.reference import torch_alexnet_class

    torch.manual_seed(seed)
    model_class, _ = torch_alexnet_class()
    return torch_to_flax(model_class().state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, metavar="IMAGE_OR_DIR", help="more images besides the samples")
    parser.add_argument("--weights", type=Path, help="variables file; without it, seeded torchvision-init weights")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed for the initialized weights (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        variables = load_variables(args.weights) if args.weights else seeded_variables(args.seed)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    images = [image for _, image in sample_images()]
    walk = find_images(args.paths)
    for problem in walk.problems:
        print(f"warning: {problem}", file=sys.stderr)
    for path in walk.images:
        try:
            images.append(load_image(path))
        except ImageReadError as e:
            print(f"{path}: {e} (left out)", file=sys.stderr)
    weights = str(args.weights) if args.weights else f"torchvision init, seed {args.seed} (not trained weights)"
    print(f"weights: {weights}")
    print(dtype_agreement(variables, images, batch_size=args.batch_size).summary())
    return 0


if __name__ == "__main__":
    # An entry script may make process-wide choices; the library never does. Before JAX
    # starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    sys.exit(main())
