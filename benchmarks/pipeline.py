#!/usr/bin/env python
"""The training input pipeline against the bare decode loop and torchvision's DataLoader, in one run.

    python benchmarks/pipeline.py                                # 512 JPEGs, batch 64, crop 224, workers 0 1 2
    python benchmarks/pipeline.py --workers 0 2 4 8 --images 2048 --output pipeline.json
    python benchmarks/pipeline.py --folder /data/imagenet/train  # an ImageFolder of your own

Images/s of RandomResizedCrop(224) + flip on the same files, each contender run in turn:

- **bare loop**: one process, no batching, nothing but PIL open, decode, crop, resize, flip, and
  the float32 normalization (`augment.train_transform`, the pipeline's work before batches were
  uint8) or the uint8 pixels (`augment.train_pixels`, exact and reduced decoding). What one
  core can do: the ceiling of a pipeline per core.
- **train_batches**: `alexnet_jax.training.pipeline.train_batches` with `workers` processes (0:
  two threads of this process), decode "exact" and "reduced", batches of uint8. The reduced
  decode only acts where a crop box is at least twice the output side: on 500x375 photos
  cropped to 224 it rarely does, at smaller crops or on larger photos it mostly does.
- **torchvision**: `ImageFolder` + `DataLoader(num_workers=W)` with `RandomResizedCrop`,
  `RandomHorizontalFlip`, `ToTensor`, `Normalize` (float32 batches), if torchvision imports.

Also a profile of the bare loop's stages (header, decode, crop and resize, normalize) and the
bytes of one batch as uint8 and as float32. Without --folder it writes --images ImageNet-like
JPEGs (500x375 and 375x500 by default, --photo-size; quality 90, 8 class folders) made from
scikit-image's photos.
Figures depend on the machine and its load: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, help="an ImageFolder to read (default: made from scikit-image's photos)")
    p.add_argument("--images", type=int, default=512, help="images to make without --folder (default 512)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="crop side (default 224)")
    p.add_argument(
        "--photo-size",
        type=int,
        nargs=2,
        default=(500, 375),
        metavar=("W", "H"),
        help="size of the made photos, landscape (portrait ones are H x W; default 500 375)",
    )
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the images per timing (default 1)")
    p.add_argument("--no-torch", action="store_true", help="leave torchvision's DataLoader out")
    p.add_argument("--output", type=Path, help="also write the results as JSON")
    return p.parse_args(argv)


def make_folder(root: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`count` ImageNet-like JPEGs in 8 class folders: random crops of scikit-image's photos, W x H or H x W."""
    from PIL import Image
    from skimage import data

    photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((left, top, left + cw, top + ch)).resize(size if i % 2 == 0 else size[::-1], Image.BILINEAR)
        folder = root / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _rate(images: int, seconds: float) -> float:
    return images / seconds


def bare_loop(paths: list[str], size: int, how: str, seed: int = 0) -> float:
    """Images/s of one process doing only the per-image work."""
    from PIL import Image

    from alexnet_jax.transforms.augment import train_pixels, train_transform

    start = time.perf_counter()
    for i, path in enumerate(paths):
        rng = np.random.default_rng([seed, i])
        with Image.open(path) as image:
            if how == "float":
                train_transform(image, size, rng)
            else:
                train_pixels(image, size, rng, how)
    return _rate(len(paths), time.perf_counter() - start)


def profile(paths: list[str], size: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the float pipeline's per-image work, over `paths`."""
    from PIL import Image

    from alexnet_jax.transforms.augment import random_resized_crop_box
    from alexnet_jax.transforms.preprocess import normalize

    stages = dict.fromkeys(("open (header)", "decode", "crop + resize + flip", "normalize (float32)"), 0.0)
    for i, path in enumerate(paths):
        rng = np.random.default_rng([0, i])
        t0 = time.perf_counter()
        image = Image.open(path)
        t1 = time.perf_counter()
        image.load()
        t2 = time.perf_counter()
        left, top, w, h = random_resized_crop_box(*image.size, rng)
        crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        array = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else crop)
        t3 = time.perf_counter()
        normalize(array)
        t4 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[key] += dt
        image.close()
    return {k: 1000 * v / len(paths) for k, v in stages.items()}


def pipeline(folder, args, workers: int, decode: str) -> float:
    from alexnet_jax.training.pipeline import steps_per_epoch, train_batches

    steps = steps_per_epoch(len(folder), args.batch_size) * args.epochs
    batches = train_batches(
        folder,
        batch_size=args.batch_size,
        image_size=args.size,
        seed=0,
        num_steps=steps + 1,
        workers=workers,
        decode=decode,
    )
    next(batches)  # workers started, first batch made: start-up is not throughput
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    rate = _rate(steps * args.batch_size, time.perf_counter() - start)
    batches.close()
    return rate


def torchvision_loader(root: Path, args, workers: int) -> float | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torchvision_import import import_torchvision

    torchvision = import_torchvision()
    import torch
    from torchvision import transforms

    torch.set_num_threads(1)  # the workers are the parallelism, as in the pipeline
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    batches = 0
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for _ in iterator:
            batches += 1
        iterator = iter(loader)
    return _rate(batches * args.batch_size, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import grain
    import jax
    import PIL

    from alexnet_jax.training.sources import image_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or make_folder(Path(tmp) / "photos", args.images, tuple(args.photo_size))
        folder = image_folder(root)
        paths = [p for p, _ in folder.samples]
        cores = len(os.sched_getaffinity(0))
        results: dict = {
            "machine": {
                "platform": platform.platform(),
                "cores": cores,
                "python": platform.python_version(),
                "jax": jax.__version__,
                "grain": getattr(grain, "__version__", "?"),
                "pillow": PIL.__version__,
            },
            "images": len(folder),
            "batch_size": args.batch_size,
            "size": args.size,
            "rows": [],
        }

        def row(name: str, workers: int | None, rate: float | None, threads: int = 1) -> None:
            # Per core: over the cores the contender can keep busy (its workers, or its threads).
            if rate is None:
                return
            used = min(threads if workers in (None, 0) else workers, cores)
            results["rows"].append({"pipeline": name, "workers": workers, "img_s": rate, "img_s_per_core": rate / used})
            print(f"{name:<44} {'' if workers is None else workers:>7} {rate:9.1f} {rate / used:9.1f}", flush=True)

        print(f"{len(folder)} images, batch {args.batch_size}, crop {args.size}, {cores} cores")
        print(f"{'pipeline':<44} {'workers':>7} {'img/s':>9} {'per core':>9}")
        for how in ("float", "exact", "reduced"):
            row(
                f"bare loop, {'float32 normalize' if how == 'float' else 'uint8 ' + how}",
                None,
                bare_loop(paths, args.size, how),
            )
        for workers in args.workers:
            for decode in ("exact", "reduced"):
                # workers=0 decodes in two threads of this process (Pillow releases the GIL).
                row(f"train_batches, uint8, {decode}", workers, pipeline(folder, args, workers, decode), threads=2)
            if not args.no_torch:
                try:
                    row("torchvision ImageFolder + DataLoader", workers, torchvision_loader(Path(root), args, workers))
                except ImportError as e:
                    print(f"torchvision left out: {e}")
        stages = profile(paths[: min(len(paths), 200)], args.size)
        results["profile_ms_per_image"] = stages
        total = sum(stages.values())
        print(
            "bare loop (float32) per image: "
            + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in stages.items())
        )
        pixels = args.batch_size * args.size * args.size * 3
        results["batch_bytes"] = {"uint8": pixels, "float32": 4 * pixels}
        print(f"one batch: {pixels / 1e6:.1f} MB as uint8, {4 * pixels / 1e6:.1f} MB as float32")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
