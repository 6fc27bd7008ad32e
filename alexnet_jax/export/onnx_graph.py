"""AlexNet or its trunk as an ONNX model, for ONNX Runtime and every runtime that reads ONNX (C++, mobile, web).

    model = onnx_model(variables)                      # needs onnx: the `export` extra
    save_onnx("alexnet.onnx", model)
    session = onnxruntime.InferenceSession("alexnet.onnx")
    logits = session.run(None, {"images": images})[0]  # (N, H, W, 3) float32, normalized

The graph is written node by node from the parameters with `onnx.helper`, one ONNX
operator per torch layer: the network is five convolutions, ReLUs, three max-pools, an
adaptive average pool and three dense layers, all of which ONNX has (the pool as two
small matrices, below). Written directly rather than traced from JAX (jax2onnx): that
converter's package pins orbax-checkpoint below the version this package trains with,
and brings equinox, dm-pix, huggingface-hub and netron along; `onnx` alone is enough here.
`tests/test_export.py` runs the model in ONNX Runtime against `AlexNet.apply` and
against torchvision's own module.

The input "images" is NHWC float32 (N, H, W, 3), normalized as for `AlexNet.apply`, and
transposed once to ONNX's NCHW inside. N, H and W are dynamic (H and W fixed with
`dynamic_size=False`); sides below 63 (31 for the trunk) fail in the runtime with a
shape error, as ONNX cannot state a minimum. torchvision's AdaptiveAvgPool2d has no ONNX
operator; its windows are computed in the graph from the input's size (`_pool_matrix`,
the rule of `models.layers.adaptive_pool_matrix`) and applied by one Einsum, which also
gives fc6's H, W, C flatten order. Outputs: "logits" (N, num_classes), or for the trunk
"relu1".."relu5" NHWC (N, h, w, C), as `trunk_features` gives them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_jax.export.stablehlo import DEFAULT_SIZE, ExportError, min_size
from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.models.alexnet import CONV_LAYERS, POOL_AFTER, TRUNK_LAYERS
from alexnet_jax.models.layers import POOL_OUTPUT, POOL_STRIDE, POOL_WINDOW
from alexnet_jax.models.trees import params_of
from alexnet_jax.models.variables import match_variables, trunk_params

OPSET = 17  # ONNX Runtime 1.14 and later run it; Einsum, GreaterOrEqual and Unsqueeze's axes input are all older
ONNX_TARGETS = ("classifier", "trunk")


def require_onnx():
    """onnx, imported. **Raises:** ExportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx ({e}); install it with: pip install 'alexnet-jax[export]'") from None
    return onnx


class _Graph:
    """Nodes and initializers being collected, with fresh names."""

    def __init__(self, onnx):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, output: str | None = None, **attrs) -> str:
        out = output or self.name(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
        return out


def _pool_matrix(g: _Graph, x: str, axis: int) -> str:
    """(6, size) float32 window weights for the NCHW tensor `x`'s `axis`: 1/len on [floor(i*s/6), ceil((i+1)*s/6))."""
    shape = g.node("Shape", [x], "shape")
    size = g.node("Gather", [shape, g.constant(np.asarray(axis, np.int64), "axis")], "size")  # int64 scalar
    i = g.constant(np.arange(POOL_OUTPUT, dtype=np.int64).reshape(-1, 1), "window")
    out = g.constant(np.asarray(POOL_OUTPUT, np.int64), "out")
    one = g.constant(np.asarray(1, np.int64), "one")
    # ONNX's integer Div truncates; every operand here is non-negative, so it floors, and
    # ceil(a / out) is floor((a + out - 1) / out).
    start = g.node("Div", [g.node("Mul", [i, size]), out], "start")
    upper = g.node(
        "Add",
        [g.node("Mul", [g.node("Add", [i, one]), size]), g.constant(np.asarray(POOL_OUTPUT - 1, np.int64), "round")],
    )
    end = g.node("Div", [upper, out], "end")
    columns = g.node("Range", [g.constant(np.asarray(0, np.int64), "zero"), size, one], "columns")  # (size,)
    inside = g.node("And", [g.node("GreaterOrEqual", [columns, start]), g.node("Less", [columns, end])], "inside")
    length = g.node("Cast", [g.node("Sub", [end, start])], "length", to=g.onnx.TensorProto.FLOAT)
    weight = g.node("Div", [g.constant(np.asarray(1, np.float32), "unit"), length], "weight")  # (6, 1) float32
    return g.node("Where", [inside, weight, g.constant(np.asarray(0, np.float32), "zero_f")], "pool_matrix")


def onnx_model(
    variables: Mapping[str, Any],
    target: str = "classifier",
    *,
    dynamic_size: bool = True,
    size: int = DEFAULT_SIZE,
    layers: Sequence[str] = TRUNK_LAYERS,
) -> Any:
    """torchvision AlexNet `variables` (`{"params": ...}` or bare, any head) as an `onnx.ModelProto`, checked.

    **Arguments:** target "classifier" (output "logits") or "trunk" (outputs `layers`,
    some of relu1..relu5); dynamic_size, dynamic H and W (else `size` x `size`; the batch
    is dynamic either way). **Raises:** ExportError for an unknown target, a size below the
    minimum, the 2012 architecture or onnx missing; ConversionError for variables that are not AlexNet's.
    """
    onnx = require_onnx()
    if target not in ONNX_TARGETS:
        raise ExportError(f"ONNX export makes one of {', '.join(ONNX_TARGETS)}, not {target!r}")
    unknown = [name for name in layers if name not in TRUNK_LAYERS]
    if unknown or not layers:
        raise ExportError(f"unknown trunk layers {unknown or '(none)'}; choose some of {', '.join(TRUNK_LAYERS)}")
    smallest = min_size(target, layers)
    if not dynamic_size and size < smallest:
        raise ExportError(f"the {target} takes sides of at least {smallest}, got size {size}")
    if target == "trunk":
        tree, num_classes = trunk_params(variables), 0  # the conv layers alone: any head, or none
    else:
        arch, num_classes = match_variables(variables, None)
        if arch != "torchvision":
            raise ExportError(f"ONNX export takes torchvision's AlexNet; these variables are the {arch} architecture's")
        tree = params_of(variables)
    params = {m: {k: np.asarray(v, np.float32) for k, v in leaves.items()} for m, leaves in tree.items()}
    g = _Graph(onnx)
    h, w = ("H", "W") if dynamic_size else (size, size)
    inputs = [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", h, w, 3])]
    x = g.node("Transpose", ["images"], "nchw", perm=[0, 3, 1, 2])
    last = len(CONV_LAYERS) if target == "classifier" else max(TRUNK_LAYERS.index(n) + 1 for n in layers)
    relus = {}
    for n, (index, _, kernel, stride, pad) in enumerate(CONV_LAYERS[:last], start=1):
        conv = params[f"features_{index}"]
        weight = g.constant(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)), f"features_{index}_weight")
        bias = g.constant(conv["bias"], f"features_{index}_bias")
        x = g.node(
            "Conv", [x, weight, bias], f"conv{n}", kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4
        )
        x = relus[f"relu{n}"] = g.node("Relu", [x], f"relu{n}_nchw")
        if index in POOL_AFTER and (n < last or target == "classifier"):
            x = g.node("MaxPool", [x], "pool", kernel_shape=[POOL_WINDOW] * 2, strides=[POOL_STRIDE] * 2)
    outputs = []
    if target == "trunk":
        for name in layers:
            g.node("Transpose", [relus[name]], output=name, perm=[0, 2, 3, 1])
            channels = CONV_LAYERS[TRUNK_LAYERS.index(name)][1]
            outputs.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", None, None, channels])
            )
    else:
        # (6, H) and (6, W) windows, one Einsum: pooled NHWC (N, 6, 6, C), flattened H, W, C as fc6 reads it.
        pooled = g.node(
            "Einsum", [_pool_matrix(g, x, 2), _pool_matrix(g, x, 3), x], "pooled", equation="ih,jw,nchw->nijc"
        )
        x = g.node("Flatten", [pooled], "flat", axis=1)
        for index, name in ((1, "fc6"), (4, "fc7"), (6, "logits")):
            dense = params[f"classifier_{index}"]
            w_, b_ = (g.constant(dense[k], f"classifier_{index}_{k}") for k in ("kernel", "bias"))
            x = g.node("Gemm", [x, w_, b_], name, output="logits" if name == "logits" else None)
            if name != "logits":
                x = g.node("Relu", [x], f"{name}_relu")
        outputs.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", num_classes]))
    graph = onnx.helper.make_graph(g.nodes, f"alexnet_{target}", inputs, outputs, g.initializers)
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="alexnet-jax"
    )
    model.ir_version = 8  # what ONNX Runtime 1.14+ reads; the newest onnx would write one older runtimes refuse
    onnx.checker.check_model(model)
    return model


def save_onnx(path: str | os.PathLike, model: Any) -> Path:
    """Write an ONNX model (under protobuf's 2 GB, as AlexNet is) to `path`, atomically. **Returns:** the path."""
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path
