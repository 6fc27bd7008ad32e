"""The PyTorch references that conversions are checked against.

torchvision's layout: torchvision's own `AlexNet` class when torchvision imports; otherwise
a verbatim copy of that class (torchvision/models/alexnet.py, BSD-3-Clause) so that
`--verify` still runs torch's kernels on torch's layout where torchvision is
missing or broken. Both load the same state_dict strictly; the tests check that
the copy and the real class give identical logits.

The 2012 paper's layout: `torch_alexnet2012_class`, written from the paper (section 3,
figure 2) in plain torch modules, is the layout `weights.convert` reads and writes for
`AlexNet2012`. Its `nn.LocalResponseNorm` takes torch's alpha, which torch divides by
the window size: the paper's alpha 1e-4 is `lrn_alpha=5e-4` here (`torch_alexnet2012`
converts).
"""

from __future__ import annotations

import importlib

from alexnet_jax.errors import first_line


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


def torch_alexnet2012_class() -> type:
    """The 2012 paper's AlexNet in torch (no torchvision needed): `AlexNet2012(num_classes, dropout, lrn_size, ...)`.

    features: 0 Conv2d(3, 96, 11, 4), 1 ReLU, 2 LocalResponseNorm, 3 MaxPool2d(3, 2),
    4 Conv2d(96, 256, 5, padding=2, groups=2), 5 ReLU, 6 LocalResponseNorm, 7 MaxPool2d(3, 2),
    8 Conv2d(256, 384, 3, padding=1), 9 ReLU, 10 Conv2d(384, 384, 3, padding=1, groups=2),
    11 ReLU, 12 Conv2d(384, 256, 3, padding=1, groups=2), 13 ReLU, 14 MaxPool2d(3, 2);
    flatten; classifier: 0 Dropout, 1 Linear(9216, 4096), 2 ReLU, 3 Dropout,
    4 Linear(4096, 4096), 5 ReLU, 6 Linear(4096, num_classes). Input (N, 3, 227, 227).
    The LRN arguments are torch's (alpha divided by size in the formula): the defaults
    are the paper's k = 2, n = 5, alpha = 1e-4 (= 5e-4 / 5), beta = 0.75.
    """
    import torch
    from torch import nn

    class AlexNet2012(nn.Module):
        def __init__(
            self,
            num_classes: int = 1000,
            dropout: float = 0.5,
            lrn_size: int = 5,
            lrn_alpha: float = 5e-4,
            lrn_beta: float = 0.75,
            lrn_k: float = 2.0,
        ) -> None:
            super().__init__()

            def lrn() -> nn.Module:
                return nn.LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)

            self.features = nn.Sequential(
                nn.Conv2d(3, 96, kernel_size=11, stride=4),
                nn.ReLU(inplace=True),
                lrn(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),
                nn.ReLU(inplace=True),
                lrn(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(256, 384, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
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
            return self.classifier(torch.flatten(self.features(x), 1))

    return AlexNet2012


def torch_alexnet2012(
    state_dict,
    num_classes: int,
    *,
    lrn_size: int = 5,
    lrn_alpha: float = 1e-4,
    lrn_beta: float = 0.75,
    lrn_k: float = 2.0,
):
    """The torch 2012 reference in eval mode with `state_dict` loaded strictly. **Returns:** (module, description).

    The LRN arguments are in the paper's convention, as `AlexNet2012`'s fields: torch's
    `nn.LocalResponseNorm` gets `lrn_alpha * lrn_size`.
    """
    cls = torch_alexnet2012_class()
    model = cls(
        num_classes=num_classes, lrn_size=lrn_size, lrn_alpha=lrn_alpha * lrn_size, lrn_beta=lrn_beta, lrn_k=lrn_k
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), "torch AlexNet2012 written from the paper (alexnet_jax.weights.reference)"


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
