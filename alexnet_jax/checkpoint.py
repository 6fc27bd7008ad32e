"""Orbax checkpoints of a training run: the last k and the best, restored exactly.

A checkpoint holds the whole `TrainState` pytree that changes (step, params,
optimizer state with its current learning rate, root RNG key) and a small JSON
record of the loop (epoch, plateau bookkeeping, best accuracy so far). The data
position is not stored: it is a function of (seed, step) (see `alexnet_jax.data`).

Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact and readable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from .steps import TrainState

BEST_METRIC = "val_top1"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; one line naming the folder."""


def _tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def _host_copy(tree: Any) -> Any:
    # The next train_step donates the state's buffers while an async save may still be
    # writing; copies on the host keep the checkpoint independent of them.
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


class Checkpoints:
    """Save and restore `TrainState`s under `directory/<step>/`.

    Keeps the `keep` most recent checkpoints plus the one with the highest
    `val_top1` among those saved with metrics (end of epoch). Saves are
    asynchronous; `wait()` blocks until the last one is on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation, enable_async_checkpointing=async_save, create=True
            ),
            item_names=("state", "loop"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest val_top1, or None when none was saved with metrics."""
        scored = []
        for step in self.all_steps():
            loop = self.loop_record(step)
            if loop.get(BEST_METRIC) is not None:
                scored.append((loop[BEST_METRIC], step))
        return max(scored)[1] if scored else None

    def loop_record(self, step: int) -> dict[str, Any]:
        """The JSON loop record saved with `step` (cheap: the arrays are not read)."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"])

    def save(self, state: TrainState, loop: dict[str, Any], *, val_top1: float | None = None) -> bool:
        """Checkpoint `state` at its step with the JSON-able `loop` record; `val_top1` ranks it for "best"
        (it is also written into the loop record).

        **Returns:** False (and saves nothing) when this step is already saved.
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        loop = {**loop, BEST_METRIC: None if val_top1 is None else float(val_top1)}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_host_copy(_tree(state))), loop=ocp.args.JsonSave(loop)
            ),
            metrics=None if val_top1 is None else {BEST_METRIC: float(val_top1)},
        )

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `step` (default: latest), in the structure of `template`, and its loop record.

        **Raises:** CheckpointError when there is no checkpoint to restore.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(template))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore())
        )
        tree = restored["state"]
        state = template.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"])
        return state, dict(restored["loop"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
