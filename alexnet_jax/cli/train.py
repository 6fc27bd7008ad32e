"""Train or fine-tune AlexNet on an ImageFolder tree.

    alexnet-jax train --data train/ --val-data val/ --workdir runs/a
    alexnet-jax train --data train/ --val-data val/ --workdir runs/a --resume
    alexnet-jax train --data train/ --val-data val/ --workdir runs/ft \\
        --init-from alexnet.msgpack --freeze-features --epochs 5 --lr 0.001
    alexnet-jax train --arch 2012 --data train/ --val-data val/ --workdir runs/paper --eval-crops 10
    alexnet-jax train ... --parallel sharded            # every GPU/TPU of this machine
    alexnet-jax train ... --parallel sharded \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # and 1 on the other host

The tree is root/<class>/<image>, as torchvision's ImageFolder reads it: --data and
--val-data hold the same class folders.

Across processes every process runs the same command but its --process-id (or sets
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on Slurm, Open MPI,
Kubernetes (JobSet) and Cloud TPU `--distributed` alone is enough: JAX finds them.
A process that fails, dies or freezes ends the others at once or within --peer-timeout seconds
(one line, exit 1).

WORKDIR gets checkpoints/ (Orbax), metrics.jsonl (one line per epoch), config.json,
run.lock, and at the end final.msgpack (read by alexnet_jax.load_variables) and curves.png.
One run at a time owns a workdir; a finished run's results are replaced only with --overwrite.
SIGTERM or Ctrl-C: a checkpoint at the next step boundary, one line, exit 128 + the signal
(143, 130); --resume continues exactly. A second Ctrl-C stops at once.
Exit status: 0 trained; 1 bad data, workdir (in use, not writable, full) or weights, a
damaged checkpoint with none intact before it, a non-finite loss, a batch that does not
split over the devices, processes that could not meet or lost a peer, or no `train` extra;
2 bad arguments; 143/130 stopped by SIGTERM/SIGINT after saving. The training flags are
`alexnet_jax.TrainConfig`'s fields; the work is in `alexnet_jax.training.loop.train_and_evaluate`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax

from alexnet_jax.cli.flags import add_dataclass_flags, dataclass_from_flags
from alexnet_jax.distributed.parallel import (
    INIT_TIMEOUT_S,
    PEER_TIMEOUT_S,
    DistributedError,
    exit_if_peer_lost,
    initialize_distributed,
    leave_run,
)
from alexnet_jax.host_memory import keep_freed_memory

# TrainConfig's module needs none of the `train` extra (Orbax, Grain, matplotlib): the flags
# and their checks work without it, and `run` says in one line that it is missing.
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.upstream import exit_without_waiting

TRAIN_EXTRA = "training needs the train extra: pip install 'alexnet-jax[train]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    workdir = parser.add_argument_group("workdir")
    workdir.add_argument("--workdir", required=True, help="where checkpoints, metrics and the final weights go")
    workdir.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    workdir.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's checkpoints and results in --workdir and start again",
    )
    add_dataclass_flags(parser.add_argument_group("the run (alexnet_jax.TrainConfig's fields)"), TrainConfig)
    processes = parser.add_argument_group("several processes (multi-host)")
    processes.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (jax.distributed.initialize); implied by the next three",
    )
    processes.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS; auto-detected on Slurm, TPU, k8s)",
    )
    # A string default goes through `type` as if given on the command line: a bad value in the
    # environment is a usage error of these flags, not a traceback.
    processes.add_argument(
        "--num-processes",
        type=int,
        default=os.environ.get("JAX_NUM_PROCESSES") or None,
        help="default $JAX_NUM_PROCESSES",
    )
    processes.add_argument(
        "--process-id",
        type=int,
        default=os.environ.get("JAX_PROCESS_ID") or None,
        help="0 .. N-1 (default $JAX_PROCESS_ID)",
    )
    processes.add_argument(
        "--init-timeout",
        type=int,
        default=INIT_TIMEOUT_S,
        help="seconds to wait for all processes to join (default %(default)s)",
    )
    processes.add_argument(
        "--peer-timeout",
        type=int,
        default=PEER_TIMEOUT_S,
        help="seconds without a heartbeat from another process before this one ends the run, "
        "with one line and exit 1 (default %(default)s)",
    )


def check(args: argparse.Namespace) -> None:
    """Build `args.config` from the flags and check it; **Raises:** ValueError (a usage error)."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --workdir, --overwrite replaces it: give one")
    args.config = dataclass_from_flags(TrainConfig, args)
    args.config.validate()  # the library's checks, reported as usage errors
    args.distributed = args.distributed or any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id)
    )


def configure_process() -> None:
    # Before JAX starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    # Orbax logs each failure (with its traceback) through absl before raising it; the
    # command reports every failure in one line of its own.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    _drop_closed_loop_errors()


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401  (curves.png at the end of a run: missing, found now and not after it)

        from alexnet_jax.training.checkpoint import CheckpointError
        from alexnet_jax.training.loop import NonFiniteLossError, train_and_evaluate
        from alexnet_jax.training.pipeline import DataError
        from alexnet_jax.training.shutdown import StoppedAtOnce, StopRequested
        from alexnet_jax.training.workdir import WorkdirBusyError
    except ImportError as e:  # Orbax, Grain or matplotlib missing: one line, not a traceback
        print(f"error: {e}; {TRAIN_EXTRA}", file=sys.stderr)
        return 1
    if args.distributed:  # before anything else touches JAX
        try:
            initialize_distributed(
                args.coordinator,
                args.num_processes,
                args.process_id,
                timeout_s=args.init_timeout,
                peer_timeout_s=args.peer_timeout,
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except DistributedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        last = train_and_evaluate(args.config, args.workdir, resume=args.resume, overwrite=args.overwrite)
    except StoppedAtOnce as e:  # a second signal: out now, without waiting for a save in progress
        print(e, file=sys.stderr)
        # A normal exit would wait for Orbax's thread to finish the abandoned save; the pipeline's
        # workers are closed already (the stop unwound through them).
        exit_without_waiting(e.exit_status)
    except StopRequested as e:  # every process stops at the same step: a normal exit
        print(e, file=sys.stderr)
        return e.exit_status
    except (CheckpointError, DataError, NonFiniteLossError, WorkdirBusyError, OSError, ValueError) as e:
        # In a multi-process run possibly this process's alone (an unreadable file on this host, a
        # save that lost a peer): leave at once, so the others' next collective fails and they end
        # too; a normal exit would wait at JAX's shutdown barrier while they wait in a collective.
        print(f"error: {e}", file=sys.stderr)
        return leave_run(1)
    except Exception as e:
        exit_if_peer_lost(e)  # in a multi-process run: one line and exit 1, else re-raised
        raise
    if jax.process_index() > 0:
        return 0  # process 0 reports for the run
    print(
        f"done: epoch {last.get('epoch')}, val top-1 {last.get('val_top1', float('nan')):.4f}, "
        f"top-5 {last.get('val_top5', float('nan')):.4f}; weights in {last['final_variables']}"
    )
    return 0


def _drop_closed_loop_errors() -> None:
    # After a failed save or restore, TensorStore finishes its pending reads and writes on its
    # own threads and wakes Orbax's asyncio loop, already closed: Python reports each as an
    # unraisable "RuntimeError: Event loop is closed" with a traceback, after the one-line
    # error. The reads a failed restore abandoned are Orbax coroutines closed when collected
    # ("Exception ignored in: <coroutine ...> GeneratorExit"), and asyncio logs the futures that
    # gathered them ("exception was never retrieved"). The one-line warning or error said it
    # all: only those go.
    default = sys.unraisablehook

    def hook(unraisable):
        error, origin = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        code = getattr(origin, "cr_code", None)
        abandoned_read = isinstance(error, GeneratorExit) and code is not None and "orbax" in code.co_filename
        if not (closed_loop or abandoned_read):
            default(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
