"""Commits checkpoint 1, starts an asynchronous save of checkpoint 2 and waits to be killed.

Usage: ``python save_and_die.py DIRECTORY``. Every leaf of checkpoint ``k`` is filled with
``k``; the state is large enough (32 MiB) that writing it takes a while, so a SIGKILL
sent when ``started 2`` is printed usually lands mid-write.
"""

import sys
import time

import jax.numpy as jnp

from rlhf_jax.train.checkpoint import Checkpointer


def state_of(step):
    return {"w": jnp.full((2048, 2048), step, jnp.float32), "step": jnp.array(step, jnp.int32)}


checkpointer = Checkpointer(sys.argv[1], save_every=1, max_to_keep=None, async_save=True)
checkpointer.save(1, state_of(1), {"step": 1})
checkpointer.wait()
checkpointer.save(2, state_of(2), {"step": 2})
print("started 2", flush=True)
time.sleep(60)
