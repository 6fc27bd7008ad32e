"""Orbax checkpoints: exact round trip, last-k-and-best retention across resumes, damaged and full-disk cases."""

from __future__ import annotations

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.steps import create_train_state, current_learning_rate, make_optimizer, set_learning_rate
from alexnet_jax.training.checkpoint import CheckpointError, Checkpoints

from helpers import run_python


def _state(seed: int = 0, lr: float = 0.1):
    model = nn.Dense(3)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))["params"]
    return create_train_state(model, params, make_optimizer(lr, weight_decay=1e-2), seed=seed)


def _step(state, k: int):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (k + 1)), state.params)
    return state.apply_gradients(grads=grads)


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )


def test_restore_gives_back_params_momentum_lr_step_and_rng_exactly(tmp_path):
    state = _state(seed=4)
    for k in range(3):
        state = _step(state, k)
    state = set_learning_rate(state, 0.0125)
    checkpoints = Checkpoints(tmp_path / "ck")
    assert checkpoints.save(state, {"epoch": 1, "note": "x"})
    checkpoints.close()

    restored, loop = Checkpoints(tmp_path / "ck").restore(_state(seed=9, lr=0.5))
    assert int(restored.step) == 3
    assert loop == {"epoch": 1, "note": "x", "val_top1": None}
    assert _leaves_equal(restored.params, state.params)
    assert _leaves_equal(restored.opt_state, state.opt_state)  # momentum buffers and hyperparameters
    assert current_learning_rate(restored) == pytest.approx(0.0125)
    np.testing.assert_array_equal(restored.rng, state.rng)
    # The restored state keeps training like the original.
    assert _leaves_equal(_step(restored, 3).params, _step(state, 3).params)


def test_keeps_the_last_k_and_the_best(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck", keep=2)
    state = _state()
    for k, top1 in enumerate([0.3, 0.9, None, 0.2, 0.4, None]):
        state = _step(state, k)
        checkpoints.save(state, {}, val_top1=top1)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 5, 6]  # 2 is the best (0.9); 5 and 6 are the last two
    assert checkpoints.best_step() == 2
    assert checkpoints.latest_step() == 6
    assert checkpoints.save(state, {}) is False  # step 6 is already there
    checkpoints.close()


def test_restore_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Checkpoints(tmp_path / "empty").restore(_state())
    with pytest.raises(ValueError, match="keep must be at least 1"):
        Checkpoints(tmp_path / "x", keep=0)


def test_the_best_survives_any_number_of_resumes(tmp_path):
    """Each save opens the folder afresh, as a resumed run does: the best's val top-1 must come from disk."""
    state = _state()
    for k, top1 in enumerate([0.9, 0.3, None, 0.2, None, 0.1]):
        state = _step(state, k)
        checkpoints = Checkpoints(tmp_path / "ck", keep=1)
        checkpoints.save(state, {}, val_top1=top1)
        checkpoints.close()
    checkpoints = Checkpoints(tmp_path / "ck", keep=1)
    assert checkpoints.all_steps() == [1, 6]  # 1 is the best (0.9), 6 the latest
    assert checkpoints.best_step() == 1
    checkpoints.close()


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, capsys):
    checkpoints, state, states = Checkpoints(tmp_path / "ck"), _state(), {}
    for k in range(3):
        state = _step(state, k)
        checkpoints.save(state, {"k": k})
        states[k + 1] = state
    checkpoints.close()
    # A file of step 3's arrays lost (a crashed copy, a cleaner, a disk error).
    lost = sorted((tmp_path / "ck" / "3" / "state" / "d").iterdir())
    for path in lost:
        path.unlink()

    checkpoints = Checkpoints(tmp_path / "ck")
    restored, loop = checkpoints.restore(_state())
    assert int(restored.step) == 2 and loop["k"] == 1
    assert _leaves_equal(restored.params, states[2].params)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"checkpoint {tmp_path / 'ck' / '3'} is damaged" in warning[0], warning
    assert "moved to damaged-3" in warning[0] and "tensorstore_spec" not in warning[0]
    assert checkpoints.all_steps() == [1, 2] and (tmp_path / "ck" / "damaged-3").is_dir()
    # The run can save step 3 again, and the set-aside copy is left for the user to inspect.
    assert checkpoints.save(_step(restored, 2), {})
    checkpoints.close()
    with pytest.raises(CheckpointError, match=r"ck/1: cannot be read"):
        shutil.rmtree(tmp_path / "ck" / "1" / "state" / "d")
        Checkpoints(tmp_path / "ck").restore(_state(), step=1)


def test_bytes_changed_in_place_are_never_restored_and_the_one_before_is(tmp_path, capsys):
    model = nn.Dense(512)  # 2 MB of kernel: a file large enough to damage in many places
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1024)))["params"]
    state = create_train_state(model, params, make_optimizer(0.1), seed=0)
    checkpoints, states = Checkpoints(tmp_path / "ck"), {}
    for k in range(2):
        state = _step(state, k)
        checkpoints.save(state, {"k": k})
        states[k + 1] = state
    checkpoints.close()
    largest = max((p for p in (tmp_path / "ck" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    pristine = largest.read_bytes()
    # 4 KiB overwritten in place at eight offsets, the file's size unchanged each time. TensorStore finds
    # some of these (a block that no longer decompresses) and reads others back without a word: the
    # digests saved with the checkpoint must refuse every one.
    reasons = []
    for offset in np.linspace(0.1, 0.9, 8) * len(pristine):
        at = int(offset)
        largest.write_bytes(pristine[:at] + bytes(4096) + pristine[at + 4096 :])
        with pytest.raises(CheckpointError, match=r"ck/2: cannot be read") as refused:
            Checkpoints(tmp_path / "ck").restore(state, step=2)
        reasons.append(str(refused.value))
    assert any("differ from the digest saved with them" in r for r in reasons), reasons
    # Without a step: set aside in one line, and the one before restored.
    restored, loop = Checkpoints(tmp_path / "ck").restore(state)
    assert int(restored.step) == 1 and loop == {"k": 0, "val_top1": None}
    assert _leaves_equal(restored.params, states[1].params)
    err = capsys.readouterr().err.splitlines()
    warning = [line for line in err if line.startswith("warning:")]
    assert len(warning) == 1 and "moved to damaged-2" in warning[0], warning
    assert not any("Traceback" in line for line in err)


# The child limits its files with RLIMIT_FSIZE: a write past the limit fails with EFBIG
# ("File too large") once SIGXFSZ is ignored, in TensorStore's C++ writes as in Python's,
# the way ENOSPC fails a write on a full disk (a small tmpfs would need root).
_FULL_DISK_CHILD = """
import resource, signal, sys, time
import flax.linen as nn, jax, jax.numpy as jnp
from alexnet_jax.training.checkpoint import CheckpointError, Checkpoints
from alexnet_jax.steps import create_train_state, make_optimizer
model = nn.Dense(512)
params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1024)))["params"]  # 2 MB, 4 MB with momentum
state = create_train_state(model, params, make_optimizer(0.1), seed=0)
checkpoints = Checkpoints(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    checkpoints.save(state, {})
    # The training loop's check after every step: the failure surfaces without another save or a wait.
    for _ in range(600):
        checkpoints.check()
        time.sleep(0.05)
except CheckpointError as e:
    print(e)
    sys.exit(1)
"""


@pytest.mark.slow  # test_io's full-disk message test is the fast one
def test_a_full_disk_during_a_save_is_one_line_and_leaves_nothing_half_written(tmp_path):
    run = run_python(["-c", _FULL_DISK_CHILD, tmp_path / "ck"], env={"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stdout.count("\n") == 1, run.stdout
    assert f"{tmp_path / 'ck' / '0'}: checkpoint not written (File too large)" in run.stdout
    assert "writing it needs about 4.2 MB" in run.stdout and "file-size limit (0.2 MB, `ulimit -f`)" in run.stdout
    assert list((tmp_path / "ck").iterdir()) == []  # Orbax's temporary folder is gone
