"""The 1000 ImageNet-1k class names, in the order of AlexNet's logits.

`assets/imagenet_classes.txt` is torchvision's
`AlexNet_Weights.IMAGENET1K_V1.meta["categories"]`, one name a line, written once;
tests/test_predict.py checks that it still equals torchvision's list.
"""

from __future__ import annotations

from importlib import resources

NUM_IMAGENET_CLASSES = 1000


def _read_classes() -> tuple[str, ...]:
    text = (resources.files("alexnet_jax") / "assets" / "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(
            f"alexnet_jax/assets/imagenet_classes.txt has {len(names)} names, expected {NUM_IMAGENET_CLASSES}; "
            "reinstall the package"
        )
    return names


IMAGENET_CLASSES: tuple[str, ...] = _read_classes()


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names for `num_classes` logits: ImageNet's for 1000, else `class_0`, `class_1`, ..."""
    if num_classes == NUM_IMAGENET_CLASSES:
        return IMAGENET_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))
