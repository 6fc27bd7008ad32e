"""`--parallel towers` in the training loop: the same run as `--parallel sharded`, and checkpoints that cross layouts.

One child process (this file as a script, XLA_FLAGS forcing 4 host devices: 2 data-parallel
pairs of towers) trains AlexNet2012 two steps through `train_and_evaluate` under `sharded`, and
resumes its step-1 checkpoint under the towers for step 2: it ends where the sharded run did, so
a step of the towers gives the sharded parameters, and a checkpoint crosses layouts.
227 px is the network's smallest input (its conv stack must end at 6x6). Tolerance 1e-5 of
each tensor's largest value: the layouts sum the same products in another order (fc8's halves,
gradients over the shards), with the same dropout masks.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import COLOURS, REPO, colour_folder, json_from_script_on_devices, relative_difference

DEVICES = 4
BATCH = 4  # one image per device under "sharded", two per pair of towers
TOLERANCE = 1e-5


def _child() -> dict:
    import shutil
    import tempfile
    from collections.abc import Callable
    from pathlib import Path

    import jax
    import numpy as np

    from alexnet_jax import load_variables
    from alexnet_jax.steps import init_params
    from alexnet_jax.training.config import TrainConfig
    from alexnet_jax.training.loop import train_and_evaluate
    from alexnet_jax.training.run import resolve_run

    assert jax.device_count() == DEVICES, jax.devices()
    root = Path(tempfile.mkdtemp())
    train = colour_folder(root / "train", 4, 0, colours=COLOURS[:2], shape=(40, 48), noise=30)  # 8 images: 2 steps
    val = colour_folder(root / "val", 2, 1, colours=COLOURS[:2], shape=(40, 48), noise=30)

    def config(parallel: str) -> TrainConfig:
        return TrainConfig(
            data=str(train),
            val_data=str(val),
            arch="2012",
            epochs=1,
            batch_size=BATCH,
            lr=0.01,
            parallel=parallel,
            save_every=1,
            progress=False,
            colour_pca="none",
        )

    def run(name: str, parallel: str, *, after_first: Callable[[], None] | None = None, resume: bool = False) -> dict:
        def on_checkpoint(step: int) -> None:
            if step == 1 and after_first is not None:
                after_first()

        last = train_and_evaluate(config(parallel), root / name, resume=resume, on_checkpoint=on_checkpoint)
        return {**last, "params": load_variables(last["final_variables"])["params"]}

    def copy_first_checkpoint() -> None:
        # The sharded run's step-1 checkpoint, as a run stopped there would leave it.
        shutil.copytree(root / "sharded" / "checkpoints", root / "sharded_then_towers" / "checkpoints")
        shutil.copy(root / "sharded" / "config.json", root / "sharded_then_towers" / "config.json")

    sharded = run("sharded", "sharded", after_first=copy_first_checkpoint)
    sharded_then_towers = run("sharded_then_towers", "towers", resume=True)
    initial = init_params(resolve_run(config("sharded")).model, seed=0, image_size=227)
    return {
        "steps": [r["step"] for r in (sharded, sharded_then_towers)],
        # Step 1 sharded, then the checkpoint resumed under the towers for step 2 (each layout's
        # compiled run costs most of this test: the other direction runs the same pieces).
        "sharded_then_towers": relative_difference(sharded_then_towers["params"], sharded["params"]),
        "val_loss": abs(sharded_then_towers["val_loss"] - sharded["val_loss"]) / sharded["val_loss"],
        "moved": relative_difference(initial, sharded["params"]),
        "finite": bool(np.isfinite(sharded["val_loss"])),
    }


@pytest.fixture(scope="module")
def result():
    return json_from_script_on_devices(__file__, DEVICES)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_towers_train_as_sharded_and_checkpoints_cross_layouts(result):
    assert result["steps"] == [2, 2]
    assert result["finite"]
    assert result["moved"] > 1e-4, result  # two steps changed the parameters: the comparison is not vacuous
    # Step 2 ran under the towers from a checkpoint the sharded layout saved.
    assert result["sharded_then_towers"] < TOLERANCE, result
    assert result["val_loss"] < TOLERANCE, result  # evaluated under the towers


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_child()))
