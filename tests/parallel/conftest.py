"""Shared, compiled-once pieces of the parallel tests (the tiny model's sharded step per mesh)."""

import functools
import math
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

# The helper module is shared with the two-process worker script, which runs outside
# pytest; make it importable under any pytest import mode.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import parallel_tiny_lm as tiny

from rlhf_jax.parallel import sharding
from rlhf_jax.parallel.mesh import make_mesh


class ShardedRun:
    """The tiny model's training step jitted over one mesh, with its shardings."""

    def __init__(self, mesh_shape):
        self.mesh = make_mesh(mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
        self.graphdef, params = _split_model()
        self.tx = tiny.make_tx()
        self.param_shardings = sharding.param_shardings(params, self.mesh)
        self.opt_shardings = sharding.optimizer_state_shardings(
            self.tx, params, self.param_shardings
        )
        self.state_shardings = (self.param_shardings, self.opt_shardings)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, sharding.batch_spec())
        self.step = sharding.jit_sharded(
            tiny.make_train_step(self.graphdef, self.tx),
            self.mesh,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0,
        )
        # Host copies: device_put onto an unchanged sharding may alias the source
        # buffers, which the donating step would then delete.
        self._host_params = jax.tree.map(np.asarray, params)

    def initial_state(self):
        params = jax.device_put(self._host_params, self.param_shardings)
        return params, jax.device_put(self.tx.init(params), self.opt_shardings)

    def train(self, state, token_batches):
        losses = []
        for tokens in token_batches:
            state, loss = self.step(state, jax.device_put(tokens, self.batch_sharding))
            losses.append(float(loss))
        return state, losses


@functools.cache
def _split_model():
    return nnx.split(tiny.make_model(), nnx.Param)


@functools.cache
def sharded_run(mesh_shape):
    return ShardedRun(mesh_shape)


@pytest.fixture(scope="session")
def run_on():
    """run_on((data, fsdp, tensor)) -> the ShardedRun for that mesh, built once per session."""
    return sharded_run
