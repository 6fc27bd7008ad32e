"""Orbax checkpoints of a training run: the last k and the best, restored exactly.

A checkpoint holds the whole `TrainState` pytree that changes (step, params,
optimizer state with its current learning rate, root RNG key) and a small JSON
record of the loop (epoch, plateau bookkeeping, best accuracy so far). The data
position is not stored: it is a function of (seed, step) (see `alexnet_jax.training.pipeline`).

Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact and readable. A save
that fails (a full disk) removes its temporary folder and raises one line naming
it and the space it needs. Each checkpoint carries a digest of every array it holds
(`digests`), checked when it is restored. A checkpoint damaged later (a file lost or
truncated, or bytes changed in place) is set aside as `damaged-<step>` with one line, and
`restore` falls back to the newest intact one. The val top-1 that ranks "best" is written into each
checkpoint (Orbax's metrics item), so the best survives any number of resumes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax.errors import first_line
from alexnet_jax.files import NO_SPACE_ERRNOS, no_space_message
from alexnet_jax.steps import TrainState

BEST_METRIC = "val_top1"
DIGESTS = "digests"  # the loop record's key for `digests(state)`
DAMAGED_PREFIX = "damaged-"  # a step folder set aside: Orbax lists only names that are step numbers


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; one line naming the folder."""


def _tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def _host_copy(tree: Any) -> Any:
    # The next train_step donates the state's buffers while an async save may still be
    # writing; copies on the host keep the checkpoint independent of them.
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def digests(tree: Any, dtypes: dict[str, str] | None = None) -> dict[str, str]:
    """A SHA-256 digest of every array of `tree` (its dtype, shape and bytes), by its path in the tree.

    Saved in each checkpoint's loop record and compared on restore: bytes damaged in place
    (a disk error, a bad copy, a stray write) that TensorStore would read back without a
    complaint are found before the run trains on them. `dtypes` (a path's dtype, as the saved
    digests name it) casts a restored leaf back to the dtype it was saved in first: a restore
    may widen a scalar (the step) to the template's dtype.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        array = np.asarray(leaf)
        if dtypes and key in dtypes:
            array = array.astype(np.dtype(dtypes[key]), copy=False)
        array = np.ascontiguousarray(array)
        h = hashlib.sha256()  # hardware-accelerated on current CPUs: about a second per GB
        h.update(array.view(np.uint8).reshape(-1) if array.size else b"")
        out[key] = f"{array.dtype.str}{list(array.shape)}:{h.hexdigest()}"
    return out


class DamagedCheckpoint(ValueError):
    """A checkpoint whose arrays do not match the digests saved with them."""


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
                policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation,
                # Orbax writes the metrics into the checkpoint only when best_fn is set; without
                # them on disk, a resumed manager sees no metrics and BestN prunes the best.
                best_fn=_best_metric,
                best_mode="max",
                enable_async_checkpointing=async_save,
                create=True,
                # What a save killed midway (SIGKILL, power loss) left: removed when the next run starts.
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "loop"),
        )
        self._pending: tuple[int, int] | None = None  # (step, bytes) of a save that may still be running
        self._failed: set[int] = set()  # steps whose save failed: their temporary folders go at close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest val_top1, or None when none was saved with metrics."""
        return self._manager.best_step()

    def loop_record(self, step: int) -> dict[str, Any]:
        """The JSON loop record saved with `step` (cheap: the arrays are not read)."""
        record = dict(self._manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"])
        record.pop(DIGESTS, None)
        return record

    def save(self, state: TrainState, loop: dict[str, Any], *, val_top1: float | None = None) -> bool:
        """Checkpoint `state` at its step with the JSON-able `loop` record; `val_top1` ranks it for "best"
        (it is also written into the loop record).

        **Returns:** False (and saves nothing) when this step is already saved.
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        tree = _host_copy(_tree(state))
        loop = {**loop, BEST_METRIC: None if val_top1 is None else float(val_top1), DIGESTS: digests(tree)}
        self.wait()  # Orbax's save waits for the one before anyway; its failure is that step's
        self._pending = (step, sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))
        with _SaveErrors(self):
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(tree), loop=ocp.args.JsonSave(loop)),
                metrics=None if val_top1 is None else {BEST_METRIC: float(val_top1)},
            )
            self._manager.check_for_errors()
        return saved

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `step` (default: the newest intact one), in the structure of `template`, and its
        loop record.

        Without `step`, a checkpoint that cannot be read is reported in one line on
        stderr, set aside as `damaged-<step>` (so the run can save that step again)
        and the one before it is tried.
        **Raises:** CheckpointError when there is no (intact) checkpoint to restore, or `step` cannot be read.
        """
        if step is not None:
            try:
                return self._restore(template, step)
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for bad files
                raise CheckpointError(f"{self.directory / str(step)}: cannot be read ({_reason(e)})") from e
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self._restore(template, step)
            except Exception as e:  # noqa: BLE001 - as above
                damaged.append(step)
                aside = self._set_aside(step)
                print(
                    f"warning: checkpoint {self.directory / str(step)} is damaged ({_reason(e)}); "
                    f"moved to {aside.name}, trying the one before",
                    file=sys.stderr,
                    flush=True,
                )
        if damaged:
            raise CheckpointError(f"{self.directory}: no intact checkpoint to resume from (damaged: {damaged})")
        raise CheckpointError(f"{self.directory}: no checkpoint to resume from")

    def _set_aside(self, step: int) -> Path:
        aside = self.directory / f"{DAMAGED_PREFIX}{step}"
        if jax.process_index() == 0:
            n = 1
            while aside.exists():
                n += 1
                aside = self.directory / f"{DAMAGED_PREFIX}{step}.{n}"
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.reload()
        return aside

    def _restore(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(template))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore())
        )
        tree, loop = restored["state"], dict(restored["loop"])
        saved = loop.pop(DIGESTS, None)  # None: a checkpoint from before digests were saved
        if saved is not None:
            found = digests(tree, {k: v.split("[", 1)[0] for k, v in saved.items()})
            changed = sorted(k for k in saved.keys() | found.keys() if saved.get(k) != found.get(k))
            if changed:
                more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                raise DamagedCheckpoint(f"the bytes of {changed[0]}{more} differ from the digest saved with them")
        state = template.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"])
        return state, loop

    def saving_step(self) -> int | None:
        """The step of a save still being written in the background, or None."""
        if self._pending is not None and self._manager.is_saving_in_progress():
            return self._pending[0]
        return None

    def complete_steps(self) -> list[int]:
        """The steps whose folders are complete on disk (Orbax renames a save's folder to its step when done),
        read from the directory: what a later run sees, whatever this manager is still writing."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        except OSError:
            return []

    def check(self) -> None:
        """Raise now when the last asynchronous save has failed, instead of at the next save; waits for nothing.

        **Raises:** CheckpointError as `save` does.
        """
        # Orbax keeps a failed save's error for the thread that finishes the save, which hands it to
        # `wait_until_finished`: once no save is in progress, waiting costs nothing and raises it.
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the last save is on disk. **Raises:** CheckpointError when it failed."""
        with _SaveErrors(self):
            self._manager.wait_until_finished()
        self._pending = None  # on disk: nothing left to check

    def close(self) -> None:
        """Finish the last save and stop Orbax's threads. **Raises:** CheckpointError when that save failed."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - a failed save was reported by wait(); close only tidies up
                pass
            for step in self._failed:  # TensorStore's threads may have written on after the first removal
                self._remove_temporary(step)

    def _remove_temporary(self, step: int) -> None:
        # Orbax writes into <step>.orbax-checkpoint-tmp*; a failed save leaves it, holding the
        # space the next save needs.
        if jax.process_index() == 0:
            for leftover in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)


def _reason(e: BaseException, limit: int = 240) -> str:
    # TensorStore appends its whole JSON spec to each message: keep the part a person reads.
    text = re.sub(r"\s*\[tensorstore_spec.*", "", first_line(e), flags=re.DOTALL)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[BEST_METRIC]


def _error_code(e: BaseException) -> int | None:
    """The errno behind an Orbax/TensorStore error: OSError's, or the os_error_code TensorStore puts in its text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        match = re.search(r"os_error_code='?(\d+)", str(e))
        if match:
            return int(match.group(1))
        e = e.__cause__ or e.__context__
    return None


class _SaveErrors:
    """Turns a failed save into one CheckpointError naming the step folder, and removes what it half wrote."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or not isinstance(error, Exception) or isinstance(error, CheckpointError):
            return False
        checkpoints = self.checkpoints
        step, needed = checkpoints._pending or (None, 0)
        checkpoints._pending = None
        folder = checkpoints.directory / str(step) if step is not None else checkpoints.directory
        if step is not None:
            checkpoints._failed.add(step)
            checkpoints._remove_temporary(step)
        checkpoints._manager.reload()
        code = _error_code(error)
        if code in NO_SPACE_ERRNOS:
            message = no_space_message(folder, needed, f"checkpoint not written ({os.strerror(code)})", code)
        else:
            message = f"{folder}: checkpoint not written ({_reason(error)})"
        raise CheckpointError(message) from error
