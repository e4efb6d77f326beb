"""Training state, pure step builders, checkpointing, metrics and the loop driver.

A step is a pure function ``step(state, batch, rng) -> (state, metrics)``; :func:`run`
jits it once with the state donated and drives it with checkpointing, exact resume and
metrics. Step builders for each method live in :mod:`rlhf_jax.train.steps`.
"""

from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.config import ConfigError, Field, main_from_flags, validate_config
from rlhf_jax.train.loop import (
    BatchSchedule,
    EpochPermutationSchedule,
    NonFiniteError,
    RunSummary,
    run,
)
from rlhf_jax.train.metrics import MetricsWriter, read_event_scalars, read_jsonl
from rlhf_jax.train.state import (
    TrainState,
    accumulate_gradients,
    make_gradient_step,
    split_micro_batches,
)

__all__ = [
    "BatchSchedule",
    "Checkpointer",
    "ConfigError",
    "EpochPermutationSchedule",
    "Field",
    "MetricsWriter",
    "NonFiniteError",
    "RunSummary",
    "TrainState",
    "abstract_state",
    "accumulate_gradients",
    "main_from_flags",
    "make_gradient_step",
    "read_event_scalars",
    "read_jsonl",
    "run",
    "split_micro_batches",
    "validate_config",
]
