"""One process of the two-process training test (run by test_multihost.py, not by pytest).

Usage: python parallel_multihost_worker.py OUTPUT_JSON
The RLHF_JAX_* environment variables say which process this is; XLA_FLAGS gives it 4 CPU
devices. Process 0 writes the losses, a parameter checksum and each process's row slice.
"""

import json
import sys

import jax
import numpy as np
import parallel_tiny_lm as tiny
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax.parallel import multihost, sharding
from rlhf_jax.parallel.mesh import make_mesh

NUM_STEPS = 3


def main(output_path):
    settings = multihost.initialize_from_env()
    assert settings is not None and jax.process_count() == 2, settings
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh((2, 2, 2))

    graphdef, params = nnx.split(tiny.make_model(), nnx.Param)
    tx = tiny.make_tx()
    param_shardings = sharding.param_shardings(params, mesh)
    opt_shardings = sharding.optimizer_state_shardings(tx, params, param_shardings)
    # Every process holds the same host values; device_put places each one's shards.
    host_params = jax.tree.map(np.asarray, params)
    host_opt_state = jax.tree.map(np.asarray, tx.init(params))
    state = jax.device_put((host_params, host_opt_state), (param_shardings, opt_shardings))
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    step = sharding.jit_sharded(
        tiny.make_train_step(graphdef, tx),
        mesh,
        in_shardings=((param_shardings, opt_shardings), batch_sharding),
        out_shardings=((param_shardings, opt_shardings), sharding.replicated(mesh)),
        donate_argnums=0,
    )

    losses = []
    rows = None
    for global_tokens in tiny.make_tokens(NUM_STEPS):
        local_tokens = multihost.local_rows(global_tokens, mesh)
        rows = multihost.process_rows(len(global_tokens), mesh)
        tokens = multihost.make_global_array(local_tokens, mesh)
        state, loss = step(state, tokens)
        losses.append(float(loss))

    # On a tensor-parallel-only mesh the batch is not split across processes: each
    # process feeds every row and the global array keeps the global batch size.
    tensor_mesh = make_mesh((1, 1, 8))
    global_tokens = tiny.make_tokens(1)[0]
    assert multihost.process_rows(len(global_tokens), tensor_mesh) == slice(0, len(global_tokens))
    replicated_batch = multihost.make_global_array(
        multihost.local_rows(global_tokens, tensor_mesh), tensor_mesh
    )
    assert replicated_batch.shape == global_tokens.shape, replicated_batch.shape

    gathered = multihost_utils.process_allgather(state[0], tiled=True)
    all_rows = multihost_utils.process_allgather(np.array([rows.start, rows.stop]))
    if jax.process_index() == 0:
        with open(output_path, "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "checksum": tiny.param_checksum(gathered),
                    "rows": np.asarray(all_rows).tolist(),
                },
                f,
            )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
