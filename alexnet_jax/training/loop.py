"""The training loop: data, steps, evaluation, checkpoints, metrics, curves.

    last = train_and_evaluate(TrainConfig(data="train/", val_data="val/", epochs=10), "runs/a")

Needs the `train` extra (Orbax, Grain, matplotlib). The config is resolved once, by
`alexnet_jax.training.run.resolve_run`, into what the loop runs; the pure steps are in
`alexnet_jax.steps`, their placement on devices in `alexnet_jax.distributed.parallel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from alexnet_jax.distributed.parallel import over_processes, sum_over_processes
from alexnet_jax.files import atomic_write_bytes, check_writable_folder
from alexnet_jax.models.trees import cast_floating
from alexnet_jax.models.variables import check_variables
from alexnet_jax.steps import (
    TrainState,
    create_train_state,
    current_learning_rate,
    eval_step,
    init_params,
    set_learning_rate,
    summarize_eval,
)
from alexnet_jax.training.checkpoint import Checkpoints
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.metrics import CURVES_FILE, METRICS_FILE, plot_curves, truncate_metrics
from alexnet_jax.training.pipeline import eval_batches, train_batches
from alexnet_jax.training.recipe import Plateau
from alexnet_jax.training.run import Run, colour_pca_values, make_tx, resolve_run
from alexnet_jax.training.shutdown import Interrupted, StoppedAtOnce, StopRequested, StopSignals
from alexnet_jax.training.sources import fingerprint
from alexnet_jax.training.workdir import (
    CHECKPOINT_DIR,
    COLOUR_PCA_FILE,
    FINAL_VARIABLES_FILE,
    check_epochs_left,
    check_workdir,
    own_workdir,
    write_run_files,
)
from alexnet_jax.transforms.augment import ColourPCA
from alexnet_jax.weights.serialization import load_variables, save_variables


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


def _initial_params(run: Run) -> dict[str, Any]:
    config = run.config
    if config.init_from is None:
        return init_params(run.model, seed=config.seed, image_size=run.arch.init_size)
    params = load_variables(config.init_from, device=False)["params"]
    # Weights of the other architecture would fail deep inside the first step: say so here.
    check_variables(params, run.arch.name)
    params = _as_param_dtype(params, np.dtype(getattr(run.model, "param_dtype", np.float32)), config.init_from)
    if params["classifier_6"]["kernel"].shape[1] != config.num_classes:
        # Fine-tuning: keep the body, draw a new head for this data set's classes as the run's init does.
        params = run.arch.replace_head(params, config.num_classes, seed=config.seed, init=config.init)
    return params


def _as_param_dtype(params: Any, dtype: np.dtype, source: str) -> Any:
    """`params` in the model's parameter dtype, with one line when that cast any (`trees.cast_floating`)."""
    params, cast = cast_floating(params, dtype)
    if cast:
        print(
            f"warning: {source}: weights stored as {', '.join(cast)}; cast to {dtype.name} for training",
            file=sys.stderr,
            flush=True,
        )
    return params


def evaluate(state: TrainState, batches, put: Callable[[dict], dict] = dict) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over `batches` (from `pipeline.eval_batches`), plus the count of skipped files.

    `put` places each batch for the state's devices (`Parallel.put_eval_batch`).
    """
    sums, skipped = [], 0
    for batch in batches:
        skipped += int(batch.pop("skipped"))
        sums.append(eval_step(state, put(batch)))
    return {**summarize_eval(jax.device_get(sums)), "skipped": sum_over_processes(skipped)}


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train AlexNet on `config.data`, evaluate on `config.val_data` every epoch, checkpoint, log.

    Writes into `workdir`: checkpoints/ (Orbax; every `save_every` steps and each
    epoch's end; last `keep` and the best kept), metrics.jsonl (one line per
    evaluation), config.json, and at the end final.msgpack (`load_variables` reads
    it) and curves.png. `resume=True` continues from the latest checkpoint and ends
    with the same parameters as a run never interrupted; the latest checkpoint when
    intact, else the newest intact one. `overwrite=True` (without `resume`) deletes
    an earlier run's checkpoints and results first; without it they are never
    replaced. `on_checkpoint(step)` is called after each checkpoint is on disk
    (tests use it to kill the run).

    One run at a time owns `workdir` (`alexnet_jax.training.workdir.WorkdirLock`). SIGTERM
    or SIGINT (from the main thread) stop the run at the next step boundary with a
    checkpoint: StopRequested, whose `exit_status` is 128 + the signal number.
    `config.parallel` spreads each step over every device ("pmap", "sharded", "towers");
    across processes (after `parallel.initialize_distributed`) each reads only its
    shard of the data and only process 0 writes files besides the checkpoints,
    which Orbax writes together.
    **Returns:** the last metrics line, with "final_variables" added.
    **Raises:** DataError, FileNotFoundError/FileExistsError (workdir), WorkdirBusyError,
    OSError (a workdir that cannot be written), CheckpointError (a failed save, no intact
    checkpoint), ValueError (config), NonFiniteLossError, StopRequested.
    """
    # Config, devices, data: every check that needs no workdir, before the workdir is touched.
    run = resolve_run(config)
    workdir = check_writable_folder(workdir, "workdir")  # before hours of training, not after
    with own_workdir(workdir, overwrite and not resume), StopSignals() as stop:
        checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, keep=run.config.keep)
        try:
            last = _train(run, workdir, checkpoints, resume, on_checkpoint, stop)
        except Interrupted as e:
            # A second signal: the user wants out now, so a save in progress is not waited for.
            complete = checkpoints.complete_steps()
            raise StoppedAtOnce(
                e.signum, checkpoints.saving_step(), complete[-1] if complete else None, str(checkpoints.directory)
            ) from None
        except BaseException:
            # Also when the workdir, the weights or a restore are refused. A failed save
            # was already raised; closing must not replace the error being raised.
            with contextlib.suppress(Exception):
                checkpoints.close()
            raise
        checkpoints.close()
        return last


def _train(
    run: Run,
    workdir: Path,
    checkpoints: Checkpoints,
    resume: bool,
    on_checkpoint: Callable[[int], None] | None,
    stop: StopSignals,
) -> dict[str, Any]:
    """The loop of `train_and_evaluate`, once it owns the workdir and its checkpoint manager exists."""
    config, parallel, per_epoch = run.config, run.parallel, run.steps_per_epoch
    primary, shard = jax.process_index() == 0, {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    data = fingerprint(run.train_data)
    data_change = check_workdir(workdir, config, resume, checkpoints.latest_step(), data=data)

    colour_pca = _colour_pca(run, workdir, primary)
    state = create_train_state(run.model, _initial_params(run), run.tx, seed=config.seed)
    loop: dict[str, Any] = {
        "epoch_loss": 0.0,
        "epoch_top1": 0.0,
        "epoch_steps": 0,
        "skipped": 0,
        "plateau": dataclasses.asdict(Plateau(patience=config.patience)),
    }
    metrics_path = workdir / METRICS_FILE
    if resume:
        state, loop = checkpoints.restore(state)  # the newest intact checkpoint: its epochs are the ones done
        check_epochs_left(workdir, config, int(loop.get("epoch", 0)))
    # Checked: from here on the workdir is this run's.
    write_run_files(workdir, config, data, replace_data=not resume or data_change is not None)
    if resume and primary:
        truncate_metrics(metrics_path, int(state.step))
    elif metrics_path.exists() and primary:
        metrics_path.unlink()
    state = parallel.put_state(state)
    plateau = Plateau(**loop["plateau"])
    step = first_step = int(state.step)
    if data_change is not None:
        # Allowed: the new data's epochs count from here, the one in progress ends unfinished.
        loop.update(epoch_base=[step, int(loop.get("epoch", 0))], epoch_loss=0.0, epoch_top1=0.0, epoch_steps=0)
        if primary:
            print(
                f"warning: {config.data}: {data_change}; epoch {loop['epoch_base'][1] + 1} starts on the new data "
                f"at step {step}",
                file=sys.stderr,
                flush=True,
            )
    # (step, epoch) where the current data began: (0, 0), or the resume that allowed a data change.
    base_step, base_epoch = loop.setdefault("epoch_base", [0, 0])
    if (base_step, base_epoch) != (0, 0):  # the schedule's epochs are the loop's (same optimizer state)
        state = state.replace(tx=make_tx(config, per_epoch, (base_step, base_epoch)))
    total_steps = base_step + (config.epochs - base_epoch) * per_epoch

    def epoch_of(step: int) -> int:
        return base_epoch + (step - base_step) // per_epoch

    def save(val_top1: float | None = None) -> None:
        record = {**loop, "plateau": dataclasses.asdict(plateau), "epoch": epoch_of(step)}
        if checkpoints.save(state, record, val_top1=val_top1) and on_checkpoint is not None:
            checkpoints.wait()
            on_checkpoint(step)

    last: dict[str, Any] = {}
    bar = tqdm(
        total=total_steps, initial=step, unit="step", disable=not (config.progress and primary), dynamic_ncols=True
    )
    started, images = time.perf_counter(), 0
    batches = train_batches(
        run.train_data,
        batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=step,
        num_steps=total_steps,
        workers=config.workers,
        arch=run.arch,
        colour_pca=colour_pca,
        decode=config.decode,
        epoch_base=(base_step, base_epoch),
        **shard,
    )
    try:
        for batch in batches:
            # One exchange per step tells every process the skipped files and whether any
            # process was asked to stop, so they all stop at the same step and save together.
            flags = over_processes(int(batch.pop("skipped")), stop.received or 0)
            if flags[:, 1].any():
                saved = None
                if step > first_step or checkpoints.latest_step() == step:  # nothing trained: nothing to save
                    save()
                    checkpoints.wait()
                    saved = str(checkpoints.directory / str(step))
                raise StopRequested(int(flags[:, 1].max()), step, saved)
            # Counted once the batch is trained: a stopped run's resume reads this batch again.
            loop["skipped"] += int(flags[:, 0].sum())
            state, metrics = parallel.step(state, parallel.put_batch(batch))
            checkpoints.check()  # a save that failed in the background stops the run here, not a save later
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                good = checkpoints.latest_step()
                kept = (
                    f"the last good checkpoint is step {good} in {checkpoints.directory}"
                    if good is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step + 1} (epoch {epoch_of(step) + 1}); stopped, {kept}. Try a lower --lr"
                )
            step += 1
            loop["epoch_loss"] += loss
            loop["epoch_top1"] += float(metrics["top1"])
            loop["epoch_steps"] += 1
            images += config.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / (time.perf_counter() - started):.1f}")
            if (step - base_step) % per_epoch == 0:
                val = evaluate(
                    state,
                    eval_batches(
                        run.val_data,
                        batch_size=config.batch_size,
                        image_size=config.image_size,
                        workers=config.workers,
                        arch=run.arch,
                        crops=config.eval_crops,
                        decode=config.decode,
                        **shard,
                    ),
                    parallel.put_eval_batch,
                )
                last = {
                    "step": step,
                    "epoch": epoch_of(step),
                    "train_loss": loop["epoch_loss"] / loop["epoch_steps"],
                    "train_top1": loop["epoch_top1"] / loop["epoch_steps"],
                    "val_loss": val["loss"],
                    "val_top1": val["top1"],
                    "val_top5": val["top5"],
                    "lr": float(metrics["lr"]),
                    "skipped_train": loop["skipped"],
                    "skipped_val": val["skipped"],
                }
                if data_change is not None:  # the first epoch on data changed at a resume says so, once
                    last["data_changed"], data_change = data_change, None
                if config.recipe == "paper" and plateau.update(val["top1"]):
                    state = parallel.put_state(set_learning_rate(state, current_learning_rate(state) * plateau.factor))
                loop.update(epoch_loss=0.0, epoch_top1=0.0, epoch_steps=0)
                # The line goes out before the checkpoint: a run killed between the two
                # resumes before this epoch's end and drops the line (truncate_metrics);
                # the other order would lose it for good.
                if primary:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.write(
                        f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, val loss {val['loss']:.4f}, "
                        f"top-1 {val['top1']:.4f}, top-5 {val['top5']:.4f}"
                    )
                save(val_top1=val["top1"])
            elif config.save_every and step % config.save_every == 0:
                save()
    finally:
        bar.close()
        # End the worker processes now, not when the generator is collected.
        batches.close()
    checkpoints.wait()
    final = workdir / FINAL_VARIABLES_FILE
    params = jax.device_get(state.params)  # replicated on every device, so each process holds them whole
    if primary:
        save_variables(final, {"params": params})
        plot_curves(metrics_path, workdir / CURVES_FILE)
    return {**last, "final_variables": str(final)}


def _colour_pca(run: Run, workdir: Path, primary: bool) -> ColourPCA | None:
    """The run's colour noise; one computed from the folder is written to colour_pca.json."""
    # Deterministic in (folder, seed): a resumed run computes the same numbers again.
    pca = colour_pca_values(run, progress=run.config.progress and primary)
    if run.colour_pca == "folder" and primary:
        atomic_write_bytes(workdir / COLOUR_PCA_FILE, (json.dumps(dataclasses.asdict(pca), indent=2) + "\n").encode())
    return pca
