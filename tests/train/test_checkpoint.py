"""Checkpoint round trips, retention, restoring onto another sharding, and killed saves."""

import os
import pathlib
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.state import TrainState

HERE = pathlib.Path(__file__).parent


def make_state(step):
    params = {"w": jnp.arange(16.0).reshape(8, 2) * step, "b": jnp.full((2,), -step)}
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx, jax.random.key(step), extra={"kl_coef": 0.5 * step})
    # A non-trivial optimiser state, so every part of the tree is distinct per step.
    state = state.apply_gradients(jax.tree.map(jnp.ones_like, params), tx)
    return state.replace(step=jnp.array(step, jnp.int32))


def test_round_trip_retention_and_metadata(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=2, max_to_keep=2)
    saved = [
        step
        for step in range(1, 8)
        if checkpointer.maybe_save(step, make_state(step), {"step": step, "config": {"lr": 1e-3}})
    ]
    checkpointer.wait()
    assert saved == [2, 4, 6]
    assert checkpointer.all_steps() == [4, 6]  # max_to_keep=2 dropped step 2
    assert checkpointer.latest_step() == 6
    restored, metadata = checkpointer.restore(abstract_state(make_state(0)))
    assert metadata == {"step": 6, "config": {"lr": 1e-3}}
    chex.assert_trees_all_equal(restored, make_state(6))  # bit-exact
    older, _ = checkpointer.restore(abstract_state(make_state(0)), step=4)
    chex.assert_trees_all_equal(older, make_state(4))
    with pytest.raises(FileNotFoundError, match="step 2"):
        checkpointer.restore(abstract_state(make_state(0)), step=2)
    checkpointer.close()


def test_restore_onto_another_sharding(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1)
    checkpointer.save(3, make_state(3), {"step": 3})
    checkpointer.wait()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    replicated = NamedSharding(mesh, PartitionSpec())
    target = abstract_state(make_state(0), replicated)
    w_sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    target = target.replace(
        params={**target.params, "w": target.params["w"].update(sharding=w_sharding)}
    )
    restored, _ = checkpointer.restore(target)
    assert restored.params["w"].sharding == w_sharding
    assert restored.params["b"].sharding == replicated
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(make_state(3)))
    checkpointer.close()


def test_empty_directory_has_no_latest_step(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1)
    assert checkpointer.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        checkpointer.restore(abstract_state(make_state(0)))
    checkpointer.close()


def test_save_killed_midway_never_becomes_latest(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, str(HERE / "save_and_die.py"), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout.readline().strip() == "started 2"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # Whether the kill came before or after the rename, the latest checkpoint must be a
    # complete one: restoring it gives exactly the values saved under that step.
    checkpointer = Checkpointer(tmp_path, save_every=1)
    latest = checkpointer.latest_step()
    assert latest in (1, 2)
    abstract = {
        "w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    restored, metadata = checkpointer.restore(abstract)
    assert metadata == {"step": latest}
    assert int(restored["step"]) == latest
    np.testing.assert_array_equal(restored["w"], np.full((2048, 2048), latest, np.float32))
    # A resumed run saves the next step, over whatever a killed save of it left.
    retry = {"w": jnp.full((2048, 2048), 7.0), "step": jnp.array(latest + 1, jnp.int32)}
    checkpointer.save(latest + 1, retry, {"step": latest + 1})
    checkpointer.wait()
    assert checkpointer.latest_step() == latest + 1
    chex.assert_trees_all_equal(checkpointer.restore(abstract)[0], retry)
    checkpointer.close()


def test_state_may_be_donated_as_soon_as_save_returns(tmp_path):
    # The loop donates the state to the next step right after starting an async save;
    # the save must therefore have its own copy when save() returns.
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=True)
    state = {"w": jnp.arange(100_000, dtype=jnp.float32)}
    checkpointer.save(1, state, {"step": 1})
    state["w"].delete()
    checkpointer.wait()
    restored, _ = checkpointer.restore({"w": jax.ShapeDtypeStruct((100_000,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.arange(100_000, dtype=np.float32))
    checkpointer.close()
