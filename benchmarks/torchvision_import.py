"""torchvision imported as tests/conftest.py imports it, for the benchmarks that compare with it.

A CUDA build of torchvision on a CPU-only torch fails to import with "operator torchvision::nms
does not exist". The benchmarks need only its models, transforms and data sets, so the two op
schemas the import looks for are defined and the import tried again.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_library = None  # the definitions live as long as this object


def import_torchvision() -> ModuleType:
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")
