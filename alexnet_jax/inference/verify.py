"""Parity of converted weights: the torch reference and the Flax model on the same images.

The bound is relative to the logits' scale, because the weights may be ImageNet's
(logits ~10-40) or freshly initialized (logits ~0.01): float32 convolutions summed
in a different order differ by ~1e-6 of the largest logit; 1e-4 leaves room for
that and still catches any wrong transform, which moves logits by O(1) of their scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jax
import numpy as np
from PIL import Image

from alexnet_jax.models.alexnet2012 import INPUT_SIZE
from alexnet_jax.models.variables import check_variables, model_for, variables_architecture
from alexnet_jax.transforms.preprocess import preprocess, preprocess_batch
from alexnet_jax.weights.convert import state_dict_architecture
from alexnet_jax.weights.reference import torch_alexnet, torch_alexnet2012
from alexnet_jax.weights.torchvision import require_torch

RTOL = 1e-4  # largest |dlogit| <= RTOL * largest |logit|
SAMPLE_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


@dataclass(frozen=True)
class ParityReport:
    reference: str
    num_images: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agree: int
    top5_agree: int  # images whose top-5 classes are identical, in order
    top5_same_set: int  # images whose top-5 classes are the same set, in any order
    rtol: float = RTOL

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.rtol * self.max_abs_logit and self.top5_agree == self.num_images

    def summary(self) -> str:
        verdict = "OK" if self.passed else "MISMATCH"
        return (
            f"{verdict}: {self.num_images} images, reference {self.reference}; "
            f"largest |logit difference| {self.max_abs_diff:.3g} "
            f"(bound {self.rtol:g} x largest |logit| {self.max_abs_logit:.3g} = {self.rtol * self.max_abs_logit:.3g}); "
            f"top-1 agree {self.top1_agree}/{self.num_images}, top-5 agree {self.top5_agree}/{self.num_images}"
        )


def top_k(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the k largest logits per row, largest first. **Returns:** (N, k) int."""
    return np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :k]


def compare_logits(reference: np.ndarray, ours: np.ndarray, *, reference_name: str = "torch") -> ParityReport:
    """Compare two (N, num_classes) logit arrays; see the module docstring for the bound."""
    reference, ours = np.asarray(reference, np.float64), np.asarray(ours, np.float64)
    if reference.shape != ours.shape:
        raise ValueError(f"logit shapes differ: reference {reference.shape}, ours {ours.shape}")
    k = min(5, reference.shape[-1])
    return ParityReport(
        reference=reference_name,
        num_images=reference.shape[0],
        max_abs_diff=float(np.abs(reference - ours).max()),
        max_abs_logit=float(np.abs(reference).max()),
        top1_agree=int((reference.argmax(-1) == ours.argmax(-1)).sum()),
        top5_agree=int((top_k(reference, k) == top_k(ours, k)).all(-1).sum()),
        top5_same_set=int(sum(set(a) == set(b) for a, b in zip(top_k(reference, k), top_k(ours, k)))),
    )


def sample_images() -> list[tuple[str, Image.Image]]:
    """The four photos shipped in `alexnet_jax/assets/samples` (see its README for their sources)."""
    folder = resources.files("alexnet_jax") / "assets" / "samples"
    images = []
    for name in SAMPLE_NAMES:
        with (folder / f"{name}.jpg").open("rb") as f:
            images.append((name, Image.open(f).convert("RGB")))
    return images


def jax_logits(variables: Mapping[str, Any], x_nhwc: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Flax logits of the model `variables` are for (`alexnet_jax.model_for`), at full float32 matmul precision.

    (GPU/TPU default to less.) `num_classes`, if given, must be the variables' head size.
    """
    model = model_for(variables)
    if num_classes is not None and num_classes != model.num_classes:
        raise ValueError(f"num_classes={num_classes} but the variables have a {model.num_classes}-class head")
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)(variables, x_nhwc))


def torch_logits(
    state_dict: Mapping[str, Any], x_nhwc: np.ndarray, num_classes: int, architecture: str = "torchvision"
) -> tuple[np.ndarray, str]:
    """Logits of the torch reference of `architecture` (`weights.reference`). **Returns:** (logits, description).

    The 2012 reference normalizes with the paper's LRN constants, `AlexNet2012`'s defaults.
    """
    torch = require_torch()  # a WeightsError that says how to install it
    tensors = {k: torch.as_tensor(np.asarray(v)) if not hasattr(v, "detach") else v for k, v in state_dict.items()}
    build = torch_alexnet2012 if architecture == "2012" else torch_alexnet
    model, description = build(tensors, num_classes)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        return model(x).numpy(), description


def verify_images(images: Sequence[Image.Image], architecture: str = "torchvision") -> np.ndarray:
    """`images` preprocessed for `architecture`: torchvision's IMAGENET1K_V1 transforms (resize 256,
    center crop 224), or for "2012" the same at the paper's 227x227 crop.
    **Returns:** (N, 224 or 227, 224 or 227, 3) float32.
    """
    if architecture != "2012":
        return preprocess_batch(images)
    return np.stack([preprocess(image, crop_size=INPUT_SIZE) for image in images])


def verify(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    images: Sequence[Image.Image] | None = None,
) -> ParityReport:
    """Run the torch reference on `state_dict` and the Flax model on `variables` over `images`.

    Either architecture (`alexnet_jax.variables_architecture`); the state_dict must be of the same one.
    **Arguments:** state_dict in the torch layout's names (torch tensors or numpy, no
    `module.` prefix); variables as `torch_to_flax` returns them; images default to
    the shipped sample photos, preprocessed by `verify_images`.
    """
    architecture = variables_architecture(variables)
    if state_dict_architecture(state_dict) != architecture:
        raise ValueError(
            f"the state_dict is {state_dict_architecture(state_dict)!r} AlexNet but the variables {architecture!r}"
        )
    num_classes = check_variables(variables)
    if images is None:
        images = [image for _, image in sample_images()]
    x = verify_images(images, architecture)
    reference, description = torch_logits(state_dict, x, num_classes, architecture)
    return compare_logits(reference, jax_logits(variables, x), reference_name=description)
