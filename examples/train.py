"""Train or fine-tune AlexNet on an ImageFolder tree (root/<class>/<image>).

    python examples/train.py --data train/ --val-data val/ --workdir runs/a
    python examples/train.py --data train/ --val-data val/ --workdir runs/a --resume
    python examples/train.py --data train/ --val-data val/ --workdir runs/ft \\
        --init-from alexnet.msgpack --freeze-features --epochs 5 --lr 0.001
    python examples/train.py --arch 2012 --data train/ --val-data val/ --workdir runs/paper --eval-crops 10
    python examples/train.py ... --parallel sharded            # every GPU/TPU of this machine
    python examples/train.py ... --parallel sharded \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # and 1 on the other host

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
split over the devices, or processes that could not meet or lost a peer; 2 bad arguments;
143/130 stopped by SIGTERM/SIGINT after saving. The work is in `alexnet_jax.training.loop.train_and_evaluate`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

try:
    from alexnet_jax import keep_freed_memory
    from alexnet_jax.archs import ARCHS, COLOUR_PCA_CHOICES
    from alexnet_jax.distributed.parallel import (
        INIT_TIMEOUT_S,
        MODES,
        PEER_TIMEOUT_S,
        DistributedError,
        exit_if_peer_lost,
        initialize_distributed,
        leave_run,
    )
    from alexnet_jax.models.layers import CONV_ALGORITHMS
    from alexnet_jax.steps import EPOCHS
    from alexnet_jax.training.checkpoint import CheckpointError
    from alexnet_jax.training.config import TrainConfig
    from alexnet_jax.training.loop import NonFiniteLossError, train_and_evaluate
    from alexnet_jax.training.pipeline import DataError
    from alexnet_jax.training.recipe import RECIPES
    from alexnet_jax.training.shutdown import StopRequested
    from alexnet_jax.training.workdir import WorkdirBusyError
    from alexnet_jax.transforms.augment import EVAL_CROPS
except ImportError as e:  # Orbax, Grain or matplotlib missing: one line, not a traceback
    sys.exit(f"error: {e}; training needs the train extra: pip install 'alexnet-jax[train]'")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training ImageFolder root")
    parser.add_argument("--val-data", required=True, help="validation ImageFolder root (same class folders)")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and the final weights go")
    parser.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        default="torchvision",
        help="torchvision: torchvision's AlexNet and recipe; 2012: the paper's AlexNet (LRN, grouped convs), "
        "its 256x256 images, random 227 crops + flips + PCA colour noise, and its recipe (default %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, help="global batch (default: 256; 128 for --arch 2012)")
    parser.add_argument(
        "--lr", type=float, help="learning rate (default 0.01 * batch-size / 256; / 128 for --arch 2012)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="training and eval crop side (default 224, at least 63; 227 for --arch 2012, which takes 227-256)",
    )
    parser.add_argument(
        "--colour-pca",
        choices=COLOUR_PCA_CHOICES,
        help="the paper's PCA colour noise: ImageNet's published eigenvalues and eigenvectors, ones computed "
        "from --data (saved to colour_pca.json), or none (default: imagenet for --arch 2012, none otherwise)",
    )
    parser.add_argument(
        "--eval-crops",
        type=int,
        choices=EVAL_CROPS,
        default=1,
        help="validation: the centre crop, or the softmax averaged over the 4 corners, the centre and their "
        "mirrors (torchvision's TenCrop order; 10x the eval compute) (default %(default)s)",
    )
    parser.add_argument("--init-from", help="variables file to start from (e.g. converted torchvision weights)")
    parser.add_argument(
        "--num-classes",
        type=int,
        help="outputs of the head (default: the number of class folders); "
        "with --init-from a head of another size is replaced by a fresh one",
    )
    parser.add_argument("--freeze-features", action="store_true", help="train only the classifier (fine-tuning)")
    parser.add_argument("--seed", type=int, default=0, help="fixes initialization, data order, augmentation, dropout")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's checkpoints and results in --workdir and start again",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        help="torchvision: lr x0.1 every --lr-step-epochs, wd 1e-4; paper: lr /10 when val top-1 stops "
        "improving, wd 5e-4, the paper's momentum rule (default: torchvision; paper for --arch 2012)",
    )
    parser.add_argument("--weight-decay", type=float, help="default: the recipe's")
    parser.add_argument("--lr-step-epochs", type=int, default=30, help="torchvision recipe (default %(default)s)")
    parser.add_argument(
        "--patience", type=int, default=1, help="paper recipe: epochs without improvement (default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1) - 1,
        help="image-decoding processes; 0 decodes in threads of this process (default %(default)s)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=1000,
        help="checkpoint every N steps, 0 for epoch ends only (default %(default)s)",
    )
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept besides the best (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--parallel",
        choices=MODES,
        default="none",
        help="none: one device; pmap: jax.pmap over this machine's devices; "
        "sharded: jit with the batch split over all devices of all processes (default %(default)s)",
    )
    parser.add_argument(
        "--conv-algorithm",
        choices=CONV_ALGORITHMS,
        default="auto",
        help="auto: Winograd for conv2-5 on a CPU in float32, where it pays over a run (faster steps, "
        "~10 s more to compile), XLA's convolution elsewhere; or force winograd / xla (default %(default)s)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="gradient accumulation: split each step's batch into this many micro-batches (default %(default)s)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (jax.distributed.initialize); implied by the next three",
    )
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS; auto-detected on Slurm, TPU, k8s)",
    )
    parser.add_argument(
        "--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), help="default $JAX_NUM_PROCESSES"
    )
    parser.add_argument(
        "--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), help="0 .. N-1 (default $JAX_PROCESS_ID)"
    )
    parser.add_argument(
        "--init-timeout",
        type=int,
        default=INIT_TIMEOUT_S,
        help="seconds to wait for all processes to join (default %(default)s)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=int,
        default=PEER_TIMEOUT_S,
        help="seconds without a heartbeat from another process before this one ends the run, "
        "with one line and exit 1 (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --workdir, --overwrite replaces it: give one")
    args.config = TrainConfig(
        data=args.data,
        val_data=args.val_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        init_from=args.init_from,
        num_classes=args.num_classes,
        seed=args.seed,
        recipe=args.recipe,
        arch=args.arch,
        colour_pca=args.colour_pca,
        eval_crops=args.eval_crops,
        weight_decay=args.weight_decay,
        lr_step_epochs=args.lr_step_epochs,
        patience=args.patience,
        freeze_features=args.freeze_features,
        workers=args.workers,
        save_every=args.save_every,
        keep=args.keep,
        progress=not args.no_progress,
        parallel=args.parallel,
        micro_batches=args.micro_batches,
        conv_algorithm=args.conv_algorithm,
    )
    try:
        args.config.validate()  # the library's checks, reported as usage errors
    except ValueError as e:
        parser.error(str(e))
    args.distributed = args.distributed or any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id)
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    import jax

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
    # error. Only those go.
    default = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook


if __name__ == "__main__":
    # An entry script may make process-wide choices; the library never does. Before JAX
    # starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    # Orbax logs each failure (with its traceback) through absl before raising it; the
    # script reports every failure in one line of its own.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    _drop_closed_loop_errors()
    sys.exit(main())
