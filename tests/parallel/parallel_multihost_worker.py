"""One process of the two-process training test (run by test_multihost.py, not by pytest).

Usage: python parallel_multihost_worker.py OUTPUT_JSON
The RLHF_JAX_* environment variables say which process this is; XLA_FLAGS gives it 4 CPU
devices. Both processes run the project's real SFT step (make_sft_step on a tiny Decoder)
on one global (2, 2, 2) mesh, each feeding only its own rows of every batch. Process 0
writes the losses and each process's row slice (JSON) and the gathered parameters (an
.npz file beside it, leaves in tree order).
"""

import json
import sys

import jax
import numpy as np
import parallel_real_steps as real
from jax.experimental import multihost_utils

from rlhf_jax.parallel import multihost
from rlhf_jax.parallel.mesh import make_mesh

NUM_STEPS = 3


def main(output_path):
    settings = multihost.initialize_from_env()
    assert settings is not None and jax.process_count() == 2, settings
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh((2, 2, 2))

    # Every process builds the same seeded state; place_state keeps its own shards.
    step = real.CompiledStep("sft", mesh)
    state = step.initial_state()
    losses = []
    rows = None
    for index in range(NUM_STEPS):
        global_batch = real.sft_batch(index)
        rows = multihost.process_rows(real.BATCH, mesh)
        state, metrics = step(state, global_batch, real.step_key(index))
        losses.append(float(metrics["loss"]))

    # On a tensor-parallel-only mesh the batch is not split across processes: each
    # process feeds every row and the global array keeps the global batch size.
    tensor_mesh = make_mesh((1, 1, 8))
    tokens = real.sft_batch(0)["input_ids"]
    assert multihost.process_rows(len(tokens), tensor_mesh) == slice(0, len(tokens))
    replicated_batch = multihost.make_global_array(
        multihost.local_rows(tokens, tensor_mesh), tensor_mesh
    )
    assert replicated_batch.shape == tokens.shape, replicated_batch.shape

    gathered = multihost_utils.process_allgather(state.params, tiled=True)
    all_rows = multihost_utils.process_allgather(np.array([rows.start, rows.stop]))
    if jax.process_index() == 0:
        np.savez(f"{output_path}.npz", *[np.asarray(leaf) for leaf in jax.tree.leaves(gathered)])
        with open(output_path, "w") as f:
            json.dump({"losses": losses, "rows": np.asarray(all_rows).tolist()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
