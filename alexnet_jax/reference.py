"""The PyTorch reference that conversions are checked against.

torchvision's own `AlexNet` class when torchvision imports; otherwise a verbatim
copy of that class (torchvision/models/alexnet.py, BSD-3-Clause) so that
`--verify` still runs torch's kernels on torch's layout where torchvision is
missing or broken. Both load the same state_dict strictly; the tests check that
the copy and the real class give identical logits.
"""

from __future__ import annotations

import importlib

from .weights import first_line


def _vendored_alexnet_class():
    import torch
    from torch import nn

    class AlexNet(nn.Module):
        def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=dropout),
                nn.Linear(256 * 6 * 6, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            x = self.classifier(x)
            return x

    return AlexNet


def torch_alexnet_class() -> tuple[type, str]:
    """(AlexNet class, description): torchvision's if it imports, else the verbatim copy."""
    try:
        return importlib.import_module("torchvision.models").AlexNet, "torchvision.models.AlexNet"
    except Exception as e:  # noqa: BLE001 - a CUDA-only torchvision fails with RuntimeError, a missing one ImportError
        reason = first_line(e)
        return _vendored_alexnet_class(), f"copy of torchvision's AlexNet (torchvision not importable: {reason})"


def torch_alexnet(state_dict, num_classes: int):
    """A torch AlexNet in eval mode with `state_dict` loaded strictly. **Returns:** (module, description)."""
    cls, description = torch_alexnet_class()
    model = cls(num_classes=num_classes)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), description
