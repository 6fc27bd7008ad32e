#!/usr/bin/env python
"""Copy lpips 0.1.4's AlexNet linear-layer weights into alexnet_jax/assets/lpips/ (run once, needs torch and lpips).

    python convert/lpips_weights.py           # write alex_v0.0.msgpack, alex_v0.1.msgpack and LICENSE-lpips.txt
    python convert/lpips_weights.py --check   # exit 1 unless the shipped files equal what it would write

Reads `lpips/weights/v{0.0,0.1}/alex.pth` from the installed wheel with
`torch.load(weights_only=True)` and writes each as a flax msgpack file under the same
names and shapes (`lin0.model.1.weight` (1, 64, 1, 1), ...), float32, bit for bit.
msgpack because the package already reads it without torch, and because its bytes
depend only on the values (an .npz holds file times), so `--check` can compare bytes.
The wheel's BSD-2-Clause license is copied beside them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

LPIPS_VERSION = "0.1.4"  # the wheel the shipped files came from
OUT = Path(__file__).resolve().parents[1] / "alexnet_jax" / "assets" / "lpips"
LICENSE_NAME = "LICENSE-lpips.txt"


def converted_files() -> dict[str, bytes]:
    """{file name: bytes} for the two weight files and the license, from the installed lpips."""
    import torch
    from flax import serialization

    from alexnet_jax import lpips as jlpips

    installed = importlib.metadata.version("lpips")
    if installed != LPIPS_VERSION:
        raise SystemExit(f"error: lpips {installed} is installed; the shipped weights are lpips {LPIPS_VERSION}'s")
    # Found through the wheel's file list, not by importing lpips: that imports torchvision.
    wheel = {str(f): f for f in importlib.metadata.files("lpips")}
    files = {}
    for version in jlpips.VERSIONS:
        pth = wheel[f"lpips/weights/v{version}/alex.pth"].locate()
        state = torch.load(pth, map_location="cpu", weights_only=True)
        arrays = {name: tensor.numpy() for name, tensor in state.items()}
        jlpips.check_lin_weights(arrays, f"lpips {installed} weights/v{version}/alex.pth")
        files[f"alex_v{version}.msgpack"] = serialization.msgpack_serialize(arrays)
    files[LICENSE_NAME] = next(f for f in wheel.values() if f.name == "LICENSE").read_text().encode()
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = p.parse_args(argv)
    from alexnet_jax.files import atomic_write_bytes

    files = converted_files()
    if args.check:
        differ = [
            name for name, data in files.items() if not (OUT / name).is_file() or (OUT / name).read_bytes() != data
        ]
        if differ:
            print(f"error: differ from the installed lpips: {', '.join(differ)}", file=sys.stderr)
            return 1
        print(f"{', '.join(files)}: equal to lpips {LPIPS_VERSION}'s")
        return 0
    for name, data in files.items():
        atomic_write_bytes(OUT / name, data)
        print(f"wrote {OUT / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
