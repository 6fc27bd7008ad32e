"""`python -m alexnet_jax ...`: the `alexnet-jax` command (`alexnet_jax.cli`)."""

import sys

from alexnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
