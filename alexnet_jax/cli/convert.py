"""Convert torch AlexNet weights to an alexnet_jax variables file.

    alexnet-jax convert --verify                       # torchvision's IMAGENET1K_V1, via torch hub
    alexnet-jax convert --checkpoint model.pth --output model.msgpack --verify

Either layout, recognized from the tensors: torchvision's AlexNet (for `alexnet_jax.AlexNet`)
or the 2012 paper's (for `alexnet_jax.AlexNet2012`; `alexnet_jax.weights.reference` has its torch
module). --verify runs the matching torch reference, and needs the `convert` extra (torch);
reading .pth files, downloading and converting do not (`alexnet_jax.weights.torch_file`).

Every failure is one line on stderr and a non-zero exit, and no output file is written
(writes are atomic, and --verify runs before the write; --output is checked for writability
first). Exit codes: 0 ok, 1 bad input, unwritable output or unavailable weights, 2 usage,
3 --verify found a mismatch, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from alexnet_jax.files import atomic_write_bytes, check_writable_folder
from alexnet_jax.host_memory import keep_freed_memory
from alexnet_jax.inference.verify import verify
from alexnet_jax.models.trees import cast_floating
from alexnet_jax.models.variables import ARCHITECTURES, ConversionError, variables_architecture
from alexnet_jax.training.shutdown import exit_status, interrupt_on_signals
from alexnet_jax.weights.convert import strip_prefix, torch_to_flax
from alexnet_jax.weights.serialization import is_safetensors, variables_from_bytes, variables_to_bytes
from alexnet_jax.weights.torchvision import (
    IMAGENET1K_V1,
    WeightsError,
    WeightsRecord,
    fetch_state_dict,
    load_checkpoint,
    require_torch,
)

EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 1, 2, 3
# --dtype's choices: what the variables file holds.
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="AlexNet weights in torchvision's layout or the 2012 paper's: a state_dict saved with "
        "torch.save (.pth/.pt), a training "
        "checkpoint holding one under 'state_dict' or 'model', or .safetensors. "
        "Default: torchvision's IMAGENET1K_V1 weights through torch hub (cached, hash-checked).",
    )
    p.add_argument(
        "--url",
        help="download from this URL instead of torchvision's (a mirror); its file name "
        "must keep the '-<sha256 prefix>.' part, which is checked",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="where to write; .safetensors for safetensors, else flax msgpack "
        "(default: the source's name with .msgpack, in the current folder)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare torch and Flax logits on sample photos first; exit 3 and write nothing on a mismatch",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="the dtype written (default float32, whatever the source holds: half-precision weights would "
        "otherwise train in half precision); float16 or bfloat16 keep a smaller file",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or Inf")
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")


def check(args: argparse.Namespace) -> None:
    """Every check of the inputs needs the files: `run` makes them."""


def configure_process() -> None:
    # Before JAX starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()
    interrupt_on_signals()  # SIGTERM mid-write: the temporary file is removed, one line, exit 143


def _describe_source(path: Path, record: WeightsRecord) -> str:
    # Only a file whose own hash matches torchvision's record is called pretrained.
    if record.is_file_of(path):
        return (
            f"torchvision {record.name} ImageNet weights ({path}, sha256 {record.sha256_prefix}…, acc@1 {record.acc1})"
        )
    return f"{path} (not torchvision's {record.name} file: its sha256 does not start with {record.sha256_prefix})"


def run(args: argparse.Namespace) -> int:
    def check_output(output: Path) -> None:
        # Before the download, the conversion and --verify, not after them.
        if output.is_dir():
            raise WeightsError(f"--output {output} is a folder; name a file")
        if not output.parent.is_dir():
            raise WeightsError(f"--output {output}: folder {output.parent} does not exist")
        check_writable_folder(output.parent, f"--output {output}: folder")

    try:
        if args.verify:
            require_torch("--verify (torch's AlexNet on sample photos)")  # before a download and a conversion
        if args.output is not None:
            check_output(args.output)
        if args.checkpoint is not None:
            if args.url:
                raise WeightsError("give --checkpoint or --url, not both")
            state_dict, path = load_checkpoint(args.checkpoint), args.checkpoint
        else:
            state_dict, path = fetch_state_dict(args.url or IMAGENET1K_V1.url, progress=not args.no_progress)
        print(f"source: {_describe_source(path, IMAGENET1K_V1)}")
        output = args.output or Path(path.stem + ".msgpack")
        if args.output is None:  # a given --output was checked before the download
            check_output(output)

        state_dict = strip_prefix(state_dict)
        variables, cast = cast_floating(
            torch_to_flax(state_dict, allow_nonfinite=args.allow_nonfinite), DTYPES[args.dtype]
        )
        if cast:
            print(f"dtype: the source's {', '.join(cast)} weights written as {args.dtype} (--dtype chooses)")
        data = variables_to_bytes(variables, safetensors=is_safetensors(output))
        restored = variables_from_bytes(data, safetensors=is_safetensors(output), name=str(output))
        num_params = sum(a.size for module in restored["params"].values() for a in module.values())
        num_classes = restored["params"]["classifier_6"]["bias"].shape[0]
        arch = ARCHITECTURES[variables_architecture(restored)]
        print(
            f"converted: {len(state_dict)} tensors, {num_params:,} parameters, {num_classes} classes; "
            f"{arch.description} (alexnet_jax.{arch.model.__name__})"
        )

        if args.verify:
            # The restored bytes are what lands on disk, so this checks the file, not just the arrays.
            report = verify(state_dict, restored)
            print(f"verify: {report.summary()}")
            if not report.passed:
                print(f"error: --verify found a mismatch; {output} was not written", file=sys.stderr)
                return EXIT_MISMATCH
        atomic_write_bytes(output, data)
        print(f"wrote {output} ({len(data) / 1e6:.1f} MB); load it with alexnet_jax.load_variables")
        return 0
    except (WeightsError, ConversionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through interrupt_on_signals
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"error: interrupted by {signal.Signals(signum).name}; nothing was written", file=sys.stderr)
        return exit_status(signum)
