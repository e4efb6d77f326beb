# ruff: noqa: E402 (torch is blocked before the imports below)
"""A small real training job for the resume test: a Flax NNX MLP on synthetic regression.

Run as ``python resume_job.py --config=resume_job.py --workdir=DIR``: this file is also
its own config file (``get_config``). It trains through ``rlhf_jax.train.loop.run`` with
checkpoints, writes the final parameters to ``DIR/final_params.npz`` and prints the run
summary as one JSON line. The loss draws input noise from the step's key, so a resumed
run only matches an uninterrupted one when the PRNG key is restored too.
"""

import dataclasses
import json
import os
import sys
import time

# tensorboardX imports torch when it is installed (it is, for the parity tests), which
# costs seconds per process and is not needed here; a plain install has no torch.
sys.modules["torch"] = None

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from rlhf_jax.objectives.reduction import reduce_loss
from rlhf_jax.train.config import Field, main_from_flags
from rlhf_jax.train.loop import EpochPermutationSchedule, run
from rlhf_jax.train.state import TrainState, make_gradient_step

SCHEMA = {
    "seed": Field(int),
    "num_examples": Field(int, minimum=1),
    "batch_size": Field(int, minimum=1),
    "num_micro_batches": Field(int, minimum=1),
    "num_steps": Field(int, minimum=1),
    "checkpoint_every": Field(int, minimum=1),
    "learning_rate": Field(float, minimum=0.0),
    "input_noise": Field(float, minimum=0.0),
    "seconds_per_step": Field(float, minimum=0.0),
}


def get_config():
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "num_examples": 64,
            "batch_size": 8,
            "num_micro_batches": 2,
            "num_steps": 60,
            "checkpoint_every": 10,
            "learning_rate": 1e-2,
            "input_noise": 0.1,
            "seconds_per_step": 0.0,
        }
    )


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.hidden(x)))[..., 0]


@dataclasses.dataclass(frozen=True)
class PacedSchedule:
    """Wraps a schedule and sleeps before each batch, so a test can kill the job mid-run."""

    inner: EpochPermutationSchedule
    seconds: float

    def batch_for_step(self, step):
        time.sleep(self.seconds)
        return self.inner.batch_for_step(step)


def train(config, workdir):
    graphdef, params = nnx.split(MLP(nnx.Rngs(config.seed)), nnx.Param)
    data_rng = np.random.default_rng(config.seed)
    x = data_rng.normal(size=(config.num_examples, 4)).astype(np.float32)
    y = np.sin(x @ np.array([1.0, -2.0, 0.5, 1.5], np.float32))

    def loss_fn(params, batch, rng):
        noisy = batch["x"] + config.input_noise * jax.random.normal(rng, batch["x"].shape)
        residual = nnx.merge(graphdef, params)(noisy) - batch["y"]
        loss, denominator = reduce_loss(residual**2, reduction="sum")
        return loss, {"denominator": denominator}

    tx = optax.adam(config.learning_rate)
    step = make_gradient_step(loss_fn, tx, num_micro_batches=config.num_micro_batches)
    schedule = EpochPermutationSchedule({"x": x, "y": y}, config.batch_size, seed=config.seed)
    state, summary = run(
        step,
        TrainState.create(params, tx, jax.random.key(config.seed + 1)),
        PacedSchedule(schedule, config.seconds_per_step),
        num_steps=config.num_steps,
        workdir=workdir,
        checkpoint_every=config.checkpoint_every,
        log_every=5,
        config=config,
        progress=False,
    )
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(state)}
    np.savez(os.path.join(workdir, "final_params.npz"), **leaves)
    print(json.dumps(dataclasses.asdict(summary)), flush=True)


if __name__ == "__main__":
    main_from_flags(train, schema=SCHEMA)
