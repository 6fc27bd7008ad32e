"""The 2012 paper's two-GPU layout in JAX: AlexNet2012's two towers on two devices.

    mesh = make_tower_mesh()                         # ("data", "model") = (devices // 2, 2)
    logits = jax.jit(tower_apply(model, mesh))(variables, images)   # model = AlexNet2012(...)

    towers = make_towers(model, global_batch=128)   # training, with the interface of parallel.Parallel
    state = towers.put_state(state)                  # each tower's half of every layer on its device
    state, metrics = towers.step(state, towers.put_batch(batch))

Section 3.2 of the paper: "the GPUs communicate only in certain layers. This means that,
for example, the kernels of layer 3 take input from all kernel maps in layer 2. However,
kernels in layer 4 take input only from those kernel maps in layer 3 which reside on the
same GPU." Here each device of the mesh axis "model" holds one tower: half the kernels of
every convolution (output channels), half the neurons of fc6 and fc7 (columns) and half
of fc8's inputs (rows). What the towers exchange, read off `CONV_LAYERS_2012`:

- conv1 reads the image, which both towers have; conv2, conv4 and conv5 (2 groups) read
  only their own tower's maps: no communication.
- conv3 (1 group) reads both towers' maps: an all-gather of conv2's pooled output.
- fc6 reads all of conv5's pooled maps (all-gather), fc7 all of fc6 (all-gather), and
  fc8's logits are the sum of the two towers' halves (psum).
- One exchange the paper's GPUs did not make: LRN's window (5 channels) straddles the
  boundary between the towers' channels, so each tower passes its 2 edge channels' squares
  to the other (a collective-permute of 2 of 48 or 128 channels). The single-device model,
  the torch reference and Caffe's bvlc_alexnet all normalize across that boundary; without
  the exchange the towers would compute another function.

Everything runs under `jax.jit` with the layout as shardings: parameters split over
"model" (`param_specs`), the batch over "data" (data parallelism when there are more than
two devices), and the towers' forward in `jax.shard_map`, which is what makes the list
above the only communication in the forward pass (the backward pass sends the same
tensors' gradients the other way, and sums parameter gradients over "data"). Dropout masks
are drawn for the whole batch before the split, from `AlexNet2012.dropout_masks`, so the
result equals the single-device model's with the same 'dropout' rng.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.distributed.parallel import check_batch, place
from alexnet_jax.models.alexnet2012 import (
    CONV_LAYERS_2012,
    AlexNet2012,
    apply_dropout,
    check_input,
    classifier,
    conv_stack,
    local_response_norm,
)
from alexnet_jax.models.layers import conv2d
from alexnet_jax.models.variables import check_variables
from alexnet_jax.steps import apply_step, device_batch

DATA_AXIS = "data"  # as parallel.DATA_AXIS: the batch is split along it
TOWER_AXIS = "model"  # one tower per device along it
TOWERS = 2  # the paper's two GPUs: conv2, conv4 and conv5 have 2 groups

# How each layer's parameters are split over the towers: convolutions and fc6/fc7 by their
# outputs (last axis), fc8 by its inputs (rows), so that its two halves sum to the logits.
_BY_OUTPUT = {"kernel": P(None, None, None, TOWER_AXIS), "bias": P(TOWER_AXIS)}
_DENSE_BY_OUTPUT = {"kernel": P(None, TOWER_AXIS), "bias": P(TOWER_AXIS)}
_PARAM_SPECS: dict[str, dict[str, P]] = {
    **{f"features_{index}": _BY_OUTPUT for index, *_ in CONV_LAYERS_2012},
    "classifier_1": _DENSE_BY_OUTPUT,
    "classifier_4": _DENSE_BY_OUTPUT,
    "classifier_6": {"kernel": P(TOWER_AXIS, None), "bias": P()},
}


def make_tower_mesh(devices: Any = None) -> Mesh:
    """A ("data", "model") mesh of (n // 2, 2) devices: one tower per device along "model".

    **Arguments:** devices, default `jax.devices()` (all processes' devices; consecutive
    pairs are towers, so with an even number of devices per process a pair never spans
    two hosts). **Raises:** ValueError for an odd number of devices.
    """
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    if devices.size < TOWERS or devices.size % TOWERS:
        raise ValueError(
            f"the two-tower layout needs an even number of devices (2 towers x data-parallel copies), got "
            f"{devices.size}; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=2 gives two"
        )
    return Mesh(devices.reshape(-1, TOWERS), (DATA_AXIS, TOWER_AXIS))


def _check_mesh(mesh: Mesh) -> None:
    if dict(mesh.shape).get(TOWER_AXIS) != TOWERS or DATA_AXIS not in mesh.shape:
        raise ValueError(
            f"the two-tower layout needs a mesh with axes {DATA_AXIS!r} and {TOWER_AXIS!r} "
            f"(size {TOWERS}), got {dict(mesh.shape)}; make one with towers.make_tower_mesh"
        )


def param_specs(params: Mapping[str, Any]) -> dict[str, dict[str, P]]:
    """The `PartitionSpec` of every AlexNet2012 parameter in the tower layout (a tree like `params`).

    **Raises:** ConversionError when `params` is not AlexNet2012's tree.
    """
    check_variables(params, "2012")
    return {module: dict(_PARAM_SPECS[module]) for module in _PARAM_SPECS}


def param_shardings(mesh: Mesh, params: Mapping[str, Any]) -> dict[str, dict[str, NamedSharding]]:
    """`param_specs` as `NamedSharding`s on `mesh`, for `jax.jit`'s in/out_shardings or `jax.device_put`."""
    _check_mesh(mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params))


def shard_params(mesh: Mesh, params: Mapping[str, Any]) -> dict[str, Any]:
    """AlexNet2012's `params` placed in the tower layout: each device holds its tower's half of every layer.

    (Replicated over "data".) **Returns:** a tree like `params` of global jax arrays.
    """
    return jax.device_put(dict(params), param_shardings(mesh, params))


def state_shardings(mesh: Mesh, tree: Any) -> Any:
    """A `NamedSharding` for every leaf of `tree` (a TrainState, say): the tower layout for parameters
    and for optimizer leaves that mirror one (momentum, Adam's moments: under the same module
    and name, of the same rank), replicated for everything else (step, rng, learning rate).
    """
    _check_mesh(mesh)

    def spec(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        module, name = (keys[-2], keys[-1]) if len(keys) >= 2 else (None, None)
        if module in _PARAM_SPECS and name in _PARAM_SPECS[module] and np.ndim(leaf) == _rank(module, name):
            return NamedSharding(mesh, _PARAM_SPECS[module][name])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, tree)


def _rank(module: str, name: str) -> int:
    # The rank of the parameter (and of what mirrors it): conv kernels 4, dense kernels 2, biases 1.
    if name == "bias":
        return 1
    return 4 if module.startswith("features_") else 2


def _edge_squares(squares: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """LRN's halo for this tower: the squares of the previous tower's last size//2 channels and of
    the next tower's first (size-1)//2 (zeros at the outer edges, where ppermute sends nothing).
    """
    before, after = size // 2, (size - 1) // 2
    forward = [(t, t + 1) for t in range(TOWERS - 1)]
    backward = [(t + 1, t) for t in range(TOWERS - 1)]
    empty = squares[..., :0]
    left = lax.ppermute(squares[..., -before:], TOWER_AXIS, forward) if before else empty
    right = lax.ppermute(squares[..., :after], TOWER_AXIS, backward) if after else empty
    return left, right


def _gather_channels(x: jax.Array) -> jax.Array:
    # Both towers' maps, tower 0's channels first: the layout of the single-device model.
    return lax.all_gather(x, TOWER_AXIS, axis=x.ndim - 1, tiled=True)


def _tower_forward(
    model: AlexNet2012, params: Mapping[str, Any], x: jax.Array, masks: tuple[jax.Array, ...]
) -> jax.Array:
    """One tower's share of `AlexNet2012.__call__`, inside `shard_map`: local shapes, explicit communication.

    **Arguments:** params, this tower's halves; x (n, 227, 227, 3) this data shard's images;
    masks () or (fc6's keep mask (n, 9216), this tower's half of fc7's (n, 2048)).
    **Returns:** (n, num_classes) logits, the same on both towers.
    """
    dtype = model.dtype

    def cast(a: jax.Array) -> jax.Array:
        return jnp.asarray(a, dtype)

    def conv(index: int, stride: int, pad: int, groups: int) -> Callable[[jax.Array], jax.Array]:
        p = params[f"features_{index}"]

        def apply(h: jax.Array) -> jax.Array:
            if groups == 1 and index != 0:  # reads every map: the paper's cross-GPU layer (conv3)
                h = _gather_channels(h)
            # This tower's kernels are its group's (or its half of an ungrouped layer's): one group here.
            return conv2d(h, cast(p["kernel"]), cast(p["bias"]), stride=stride, padding=pad)

        return apply

    def lrn(h: jax.Array) -> jax.Array:
        squares = jnp.square(h.astype(jnp.float32) if jnp.finfo(h.dtype).bits < 32 else h)
        halo = _edge_squares(squares, model.lrn_size)
        return local_response_norm(
            h, size=model.lrn_size, alpha=model.lrn_alpha, beta=model.lrn_beta, k=model.lrn_k, halo=halo
        )

    def dense(name: str, gather: bool = False, reduce: bool = False) -> Callable[[jax.Array], jax.Array]:
        p = params[name]

        def apply(h: jax.Array) -> jax.Array:
            if gather:
                h = _gather_channels(h)
            y = jnp.dot(h, cast(p["kernel"]))
            if reduce:  # fc8: each tower holds the rows of its own fc7 neurons; the halves sum
                y = lax.psum(y, TOWER_AXIS)
            return y + cast(p["bias"])

        return apply

    mask6, mask7 = masks if masks else (None, None)
    convs = [conv(index, stride, pad, groups) for index, _, _, stride, pad, groups in CONV_LAYERS_2012]
    h = _gather_channels(conv_stack(convs, cast(x), lrn))  # fc6 reads all of conv5's maps
    return classifier(
        h,
        dense("classifier_1"),
        dense("classifier_4", gather=True),
        dense("classifier_6", reduce=True),
        lambda a: apply_dropout(a, mask6, model.dropout_rate),
        lambda a: apply_dropout(a, mask7, model.dropout_rate),
    )


def tower_apply(model: AlexNet2012, mesh: Mesh) -> Callable[..., jax.Array]:
    """`model.apply` computed in the two-tower layout on `mesh`: the same signature, the same numbers.

    The returned `apply(variables, x, train=False, rngs=None)` is meant for `jax.jit`
    (and as a TrainState's `apply_fn`); parameters placed by `shard_params` are used where
    they are, others are moved there. Within float32 rounding it equals `model.apply` with
    the same arguments, dropout masks included (they come from `model.dropout_masks`).
    **Arguments** of `apply`: variables `{"params": ...}` of AlexNet2012; x (N, 227, 227, 3)
    with N a multiple of the mesh's "data" size; rngs with a 'dropout' key when `train`.
    **Returns:** logits (N, num_classes), split over "data".
    """
    if not isinstance(model, AlexNet2012):
        raise ValueError(f"the two-tower layout is AlexNet2012's; got {type(model).__name__}")
    _check_mesh(mesh)

    def apply(variables: Mapping[str, Any], x: jax.Array, train: bool = False, rngs: Any = None) -> jax.Array:
        check_input(x)
        data = mesh.shape[DATA_AXIS]
        if x.shape[0] % data:
            raise ValueError(f"a batch of {x.shape[0]} does not split over {data} data-parallel tower pairs")
        params = variables["params"]
        mask6, mask7 = model.apply({"params": params}, x.shape[0], train, method=AlexNet2012.dropout_masks, rngs=rngs)
        masks, mask_specs = ((), ()) if mask6 is None else ((mask6, mask7), (P(DATA_AXIS), P(DATA_AXIS, TOWER_AXIS)))
        specs = (param_specs(params), P(DATA_AXIS), mask_specs)
        forward = jax.shard_map(
            functools.partial(_tower_forward, model), mesh=mesh, in_specs=specs, out_specs=P(DATA_AXIS)
        )
        return forward(*_constrain(mesh, (params, x, masks), specs))

    return apply


def _constrain(mesh: Mesh, tree: Any, specs: Any) -> Any:
    """`tree` laid out as `specs` say: shard_map takes arrays in its in_specs as they are.

    On a mesh with explicit axes (`jax.make_mesh`'s default) shard_map refuses arrays laid
    out otherwise, so they are resharded; on auto axes a sharding constraint does it.
    """
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    if explicit:
        return jax.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


@dataclasses.dataclass(frozen=True)
class Towers:
    """Training in the two-tower layout, with the interface of `parallel.Parallel`; see `make_towers`."""

    model: AlexNet2012
    mesh: Mesh
    micro_steps: int = 1
    mode: str = "towers"
    _steps: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def axis(self) -> str:
        return DATA_AXIS

    def put_state(self, state: Any) -> Any:
        """`state` with `apply_fn` the tower forward and every leaf placed by `state_shardings`."""
        state = state.replace(apply_fn=tower_apply(self.model, self.mesh))
        return jax.tree.map(lambda leaf, sharding: place(leaf, sharding), state, state_shardings(self.mesh, state))

    def step(self, state: Any, batch: Mapping[str, Any]) -> tuple[Any, dict[str, jax.Array]]:
        """`steps.apply_step` jitted with the tower shardings (compiled once per state structure), state donated."""
        treedef = jax.tree.structure(state)
        if treedef not in self._steps:
            shardings = state_shardings(self.mesh, state)
            self._steps[treedef] = jax.jit(
                functools.partial(apply_step, micro_steps=self.micro_steps),
                in_shardings=(shardings, NamedSharding(self.mesh, P(DATA_AXIS))),
                out_shardings=(shardings, NamedSharding(self.mesh, P())),
                donate_argnums=0,
            )
        return self._steps[treedef](state, batch)

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This process's part of a batch (image, label, mask) as global arrays split along "data"."""
        return self.put_eval_batch(batch)

    def put_eval_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return place(device_batch(batch), NamedSharding(self.mesh, P(DATA_AXIS)))


def make_towers(model: AlexNet2012, *, global_batch: int, micro_steps: int = 1, devices: Any = None) -> Towers:
    """Training in the two-tower layout on every device (pairs of towers x data parallelism).

    **Raises:** ValueError for a model other than AlexNet2012, an odd number of devices,
    or a global batch that does not split over the data-parallel pairs x micro-batches.
    """
    if not isinstance(model, AlexNet2012):
        raise ValueError(f"the two-tower layout is AlexNet2012's; got {type(model).__name__}")
    return Towers(model, check_towers(global_batch=global_batch, micro_steps=micro_steps, devices=devices), micro_steps)


def check_towers(*, global_batch: int, micro_steps: int = 1, devices: Any = None) -> Mesh:
    """The tower mesh of `devices` (default all), checked against the batch before any model or data exists.

    **Raises:** ValueError for an odd number of devices, or a global batch that does not
    split over the data-parallel pairs x micro-batches.
    """
    mesh = make_tower_mesh(devices)
    check_batch(global_batch, mesh.shape[DATA_AXIS], micro_steps)
    return mesh
