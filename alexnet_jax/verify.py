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

from .model import AlexNet
from .preprocess import preprocess_batch

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
    """The four photos shipped in `alexnet_jax/samples` (see its README for their sources)."""
    folder = resources.files("alexnet_jax") / "samples"
    images = []
    for name in SAMPLE_NAMES:
        with (folder / f"{name}.jpg").open("rb") as f:
            images.append((name, Image.open(f).convert("RGB")))
    return images


def jax_logits(variables: Mapping[str, Any], x_nhwc: np.ndarray, num_classes: int) -> np.ndarray:
    """Flax logits at full float32 matmul precision (GPU/TPU default to less)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(AlexNet(num_classes=num_classes).apply)(variables, x_nhwc))


def torch_logits(state_dict: Mapping[str, Any], x_nhwc: np.ndarray, num_classes: int) -> tuple[np.ndarray, str]:
    """Logits of the torch reference (see `reference.py`). **Returns:** (logits, reference description)."""
    from .reference import torch_alexnet
    from .weights import _require_torch

    torch = _require_torch()  # a WeightsError that says how to install it

    tensors = {k: torch.as_tensor(np.asarray(v)) if not hasattr(v, "detach") else v for k, v in state_dict.items()}
    model, description = torch_alexnet(tensors, num_classes)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        return model(x).numpy(), description


def verify(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    images: Sequence[Image.Image] | None = None,
) -> ParityReport:
    """Run the torch reference on `state_dict` and AlexNet on `variables` over `images`.

    **Arguments:** state_dict in torchvision's names (torch tensors or numpy, no
    `module.` prefix); variables as `torch_to_flax` returns them; images default to
    the shipped sample photos, preprocessed as torchvision's IMAGENET1K_V1 transforms.
    """
    from .convert import check_variables

    num_classes = check_variables(variables)
    if images is None:
        images = [image for _, image in sample_images()]
    x = preprocess_batch(images)
    reference, description = torch_logits(state_dict, x, num_classes)
    return compare_logits(reference, jax_logits(variables, x, num_classes), reference_name=description)
