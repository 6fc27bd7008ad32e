"""Shared fixtures: the real torchvision, seeded weights in its exact format, real photos; the tiny test network
and colour folders for the orchestration tests. Markers (pyproject.toml): slow, multiprocess, torch."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# One compilation cache for this test session, shared with the child processes that the
# CLI, training and multi-device tests start (they inherit the environment): they compile
# the same programs again and again, and the Winograd convolutions make AlexNet's programs
# take seconds to compile on CPU. Fresh per session, so no run reuses another's binaries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="alexnet-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    # A size bound makes JAX lock the cache, so processes compiling at once (the multi-host
    # test) never read an entry another one is still writing.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

# Parity must hold at full float32; GPU and TPU default to lower-precision matmuls.
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def _import_torchvision():
    """Import the real torchvision, working around a CUDA build on a CPU-only torch.

    torchvision 0.28.0 on PyPI is a CUDA build; against the CPU torch its C++ ops fail
    to load and the import dies with "operator torchvision::nms does not exist". The
    Python parts we test (models, transforms) need only the schemas of the two ops
    that `_meta_registrations` registers fakes for: benchmarks/torchvision_import.py defines
    those and imports again, only when the extension failed (the benchmarks share it).
    """
    from helpers import REPO, load_script

    return load_script(REPO / "benchmarks" / "torchvision_import.py").import_torchvision()


@pytest.fixture(scope="session")
def torchvision():
    return _import_torchvision()


@pytest.fixture(scope="session")
def torchvision_state_dict(torchvision):
    """state_dict of `torchvision.models.alexnet()` initialized under a seed, exactly as torchvision stores it."""
    import torch

    cache = {}

    def make(seed: int = 0, num_classes: int = 1000):
        if (seed, num_classes) not in cache:
            torch.manual_seed(seed)
            model = torchvision.models.alexnet(num_classes=num_classes)
            cache[seed, num_classes] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cache[seed, num_classes]

    return make


@pytest.fixture(scope="session")
def photos():
    """Real photos that scikit-image ships, as PIL RGB images, by name."""
    from PIL import Image
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTO_NAMES}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def flax_variables():
    """Flax-initialized AlexNet variables, cached by (seed, num_classes): init draws 61M numbers, ~3 s."""
    import jax.numpy as jnp

    from alexnet_jax import AlexNet

    cache = {}

    def make(seed: int = 0, num_classes: int = 1000):
        if (seed, num_classes) not in cache:
            init = jax.jit(AlexNet(num_classes=num_classes).init)
            cache[seed, num_classes] = jax.device_get(init(jax.random.key(seed), jnp.zeros((1, 63, 63, 3))))
        return cache[seed, num_classes]

    return make


@pytest.fixture(scope="session")
def trunk_variables():
    """Variables of AlexNet's five conv layers alone (no classifier), what the trunk and LPIPS read: float32
    numpy, LeCun-normal kernels and small biases from seed 0, drawn without compiling anything."""
    from alexnet_jax.models.variables import param_shapes

    rng = np.random.default_rng(0)
    params: dict = {}
    for key, shape in param_shapes(1000).items():
        module, leaf = key.split("/")
        if module.startswith("features_"):
            scale = 0.01 if leaf == "bias" else np.prod(shape[:-1]) ** -0.5
            params.setdefault(module, {})[leaf] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return {"params": params}


@pytest.fixture(scope="module")
def tiny():
    """The tests' tiny network registered as an architecture ("tiny") for the module's tests; yields the name.

    Module-scoped, so a module's fixtures that train (a reference run shared by several tests)
    can use it; taken out at the module's end (`tiny_arch.registered`).
    """
    from tiny_arch import registered

    with registered() as name:
        yield name


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """(train, val) ImageFolders of three colour classes (`helpers.colour_folder`, seeds 0 and 1), by images per
    class: `colour_data(8, 3)` is 24 training and 9 validation images. Made once per session and size."""
    from helpers import colour_folder

    cache = {}

    def make(train_per_class: int, val_per_class: int):
        if (train_per_class, val_per_class) not in cache:
            root = tmp_path_factory.mktemp(f"colours-{train_per_class}-{val_per_class}")
            cache[train_per_class, val_per_class] = (
                colour_folder(root / "train", train_per_class, 0),
                colour_folder(root / "val", val_per_class, 1),
            )
        return cache[train_per_class, val_per_class]

    return make


def pytest_collection_modifyitems(config, items):
    """A test that reaches torchvision through the fixtures must carry the torch marker (`-m "not torch"`
    would otherwise run it); refused here, at collection, with the tests named."""
    unmarked = [
        item.nodeid for item in items if "torchvision" in item.fixturenames and not item.get_closest_marker("torch")
    ]
    if unmarked:
        raise pytest.UsageError(f"mark torch, as they use the torchvision fixture: {', '.join(unmarked)}")
