"""Draw AlexNet's 64 learned conv1 kernels (11x11x3) as an 8x8 grid PNG, as in the paper's Figure 3.

python examples/draw_conv1_filters.py --weights alexnet.msgpack --output conv1_filters.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alexnet_jax import keep_freed_memory, load_variables
from alexnet_jax.inference.pictures import save_conv1_filters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, type=Path, help="variables file from alexnet-jax convert")
    parser.add_argument(
        "--output", type=Path, default=Path("conv1_filters.png"), help="PNG to write (default %(default)s)"
    )
    parser.add_argument("--scale", type=int, default=4, help="pixels per kernel weight (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        variables = load_variables(args.weights)
        path = save_conv1_filters(args.output, variables, scale=args.scale)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # An entry script may make process-wide choices; the library never does. Before JAX
    # starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    sys.exit(main())
