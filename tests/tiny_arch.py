"""A tiny AlexNet-shaped network for the tests of orchestration (resume, signals, workdirs, lost peers, multi-host).

Those tests are about the training machinery, not the numbers of the real networks (the
parity tests keep those on torchvision's AlexNet and the paper's): with 61M parameters each
of their checkpoints is ~0.5 GB and each run a minute of compiling and stepping. This one has
~170k parameters, AlexNet's layer names (`features_0`, `features_3`, `classifier_1/4/6`, so
`freeze_features` and `replace_head` work on it) and computes with the package's own layers
(`Conv` with its algorithm choice, torch's max-pool, the adaptive average pool).

It enters the package's name tables through `archs.register_arch` as "tiny":

    with registered():                                   # in this process, for a test or a module
        train_and_evaluate(TrainConfig(..., arch="tiny"), workdir)
    python tests/train_tiny.py --arch tiny --data ...    # examples/train.py in a child process
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.archs import ARCHS, Arch, register_arch
from alexnet_jax.models.alexnet import HIDDEN
from alexnet_jax.models.layers import CONV_ALGORITHMS, POOL_OUTPUT, Conv, adaptive_avg_pool, max_pool
from alexnet_jax.models.variables import ARCHITECTURES, Architecture
from alexnet_jax.transforms.augment import eval_pixels, eval_transform, train_pixels, train_transform

if TYPE_CHECKING:
    from alexnet_jax.training.config import TrainConfig

NAME = "tiny"
# (torchvision-style index, out channels, kernel, stride, padding); a max-pool follows each.
CONVS = ((0, 8, 5, 2, 2), (3, 16, 3, 1, 1))
MIN_SIZE = 13  # the smallest side that survives both pools
FC6 = 32
# fc7 keeps AlexNet's width: `replace_head` draws a new head for a 4096-wide fc7 (fine-tuning tests use it).
FC7 = HIDDEN
# The training CLI; tests/train_tiny.py (helpers.TRAIN_TINY) runs it with this network registered.
# (Not helpers.REPO: this module is imported by those training processes, which need nothing of pytest's.)
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    # LeCun normal (Conv's default) drawn as a (k*k*in, out) matrix and reshaped: the same fan-in and
    # the same numbers, and XLA on a CPU compiles a 2-D draw far faster than a 4-D one.
    return nn.initializers.lecun_normal()(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


class TinyAlexNet(nn.Module):
    """Two convolutions and AlexNet's classifier, small: the fields and call of `AlexNet`.

    `__call__(x, train=False)`: x (N, H, W, 3), H, W >= 13. **Returns:** logits (N, num_classes).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv_algorithm: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = jnp.asarray(x, self.dtype)
        for index, features, kernel, stride, pad in CONVS:
            conv = Conv(
                features,
                kernel,
                stride,
                pad,
                algorithm=self.conv_algorithm,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_conv_init,
                name=f"features_{index}",
            )
            x = max_pool(nn.relu(conv(x)))
        x = adaptive_avg_pool(x).reshape((x.shape[0], -1))
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(dense(FC6, name="classifier_1")(nn.Dropout(self.dropout_rate)(x, deterministic=not train)))
        x = nn.relu(dense(FC7, name="classifier_4")(nn.Dropout(self.dropout_rate)(x, deterministic=not train)))
        return dense(self.num_classes, name="classifier_6")(x)


def tiny_model(num_classes: int, conv_algorithm: str = "xla", dtype: Any = jnp.float32) -> nn.Module:
    """`Arch.model` of "tiny"."""
    return TinyAlexNet(num_classes=num_classes, conv_algorithm=conv_algorithm, dtype=dtype)


def _takes(size: int) -> bool:
    # A module-level function, not a lambda: the record stays picklable.
    return size >= MIN_SIZE


ARCH = Arch(
    name=NAME,
    model=tiny_model,
    image_size=64,
    init_size=MIN_SIZE,
    image_sizes=_takes,
    size_rule=f"at least {MIN_SIZE} (the tiny test network's smallest input)",
    train_transform=train_transform,
    eval_transform=eval_transform,
    train_pixels=train_pixels,
    eval_pixels=eval_pixels,
    recipe="torchvision",
    batch_size=256,
    colour_pca="none",
    conv_algorithms=CONV_ALGORITHMS,
)
LAYOUT = Architecture(
    name=NAME,
    description="the tests' tiny AlexNet",
    model=TinyAlexNet,
    convs=tuple((index, out, kernel, 1) for index, out, kernel, _, _ in CONVS),
    classifier=((1, CONVS[-1][1] * POOL_OUTPUT * POOL_OUTPUT, FC6), (4, FC6, FC7), (6, FC7, None)),
)


def register() -> None:
    """Put "tiny" into the name tables of this process (`archs.register_arch`); for child processes."""
    register_arch(ARCH, LAYOUT)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """Registers "tiny" for the duration of the block; yields its name.

    Taken out again at the end, so the rest of a one-process test session sees the package's
    two architectures alone (their error messages list the names; `archs.register_arch` has
    no inverse, as nothing but a test needs one).
    """
    register()
    try:
        yield NAME
    finally:
        del ARCHS[NAME], ARCHITECTURES[NAME]


def tiny_config(data: tuple[Path, Path], **fields: Any) -> TrainConfig:
    """A `TrainConfig` for "tiny" on (train, val) folders: one epoch of batches of 8 at 64x64, quiet, XLA's
    convolution (these tests are about the loop; it compiles in a fraction of Winograd's time), saved at
    the epoch's end only, `fields` replacing any of that. At lr 0.01 the tiny network's 4096-wide fc7
    diverges within a few epochs on the colour folders; 0.003 learns them in 16 steps.
    """
    from alexnet_jax.training.config import TrainConfig

    train, val = data
    defaults = dict(epochs=1, batch_size=8, lr=0.003, image_size=64, save_every=0, keep=1, progress=False)
    return TrainConfig(
        **{"arch": NAME, "data": str(train), "val_data": str(val), "conv_algorithm": "xla", **defaults, **fields}
    )


def train_flags(config: TrainConfig, workdir: str | os.PathLike) -> list[str]:
    """The training CLI's flags for a `tiny_config` and `workdir` (the fields it sets, and the workers)."""
    flags = ["--arch", config.arch, "--data", config.data, "--val-data", config.val_data, "--workdir", str(workdir)]
    for name in ("epochs", "batch_size", "lr", "image_size", "save_every", "keep", "workers", "conv_algorithm"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return flags + ([] if config.progress else ["--no-progress"])


def run_train_script(argv: list[str]) -> None:
    """Run examples/train.py with `argv` as its `__main__` would run, in this process; exits with its status.

    Its code runs in a fresh namespace named `__main__` without replacing the caller in
    `sys.modules` (as `runpy.run_path` would): the processes that Grain spawns import the
    caller's file again as their `__main__`, and that file registers "tiny" at import.
    """
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    code = compile(TRAIN_SCRIPT.read_text(), str(TRAIN_SCRIPT), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(TRAIN_SCRIPT), "__builtins__": builtins})
