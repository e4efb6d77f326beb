"""Pieces every training step shares: model splitting, the optimiser, paired forwards, evaluation.

A step never holds a Flax module: the model is split once into a static graph definition
(closed over by the step) and a parameter pytree (in the state), and merged inside the
pure step (:func:`split_model`, ``nnx.merge``). Preference batches hold a chosen and a
rejected row per pair; :func:`concat_pairs` stacks them so that one forward pass over
``[2B, L]`` serves both (the two halves are split again afterwards), which halves the
number of kernel launches and keeps the two log-probabilities of a pair computed by the
same program.

Evaluation runs a jitted per-example forward (compiled once, on fixed-shape batches) over
a whole held-out set and then calls the objective *once* on the concatenated per-example
outputs (:func:`evaluate`), so held-out losses and accuracies are exact set-level
quantities rather than averages of batch averages, and the padded rows of the last batch
are simply dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.data.task_batches import sequential_batches
from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.train.state import Metrics, PyTree, TrainState

Batch = Mapping[str, Array]
ForwardFn = Callable[..., dict[str, Array]]
Summariser = Callable[[dict[str, np.ndarray]], dict[str, float]]
StepFn = Callable[[TrainState, Batch, Array], tuple[TrainState, Metrics]]
Evaluator = Callable[[TrainState, Mapping[str, np.ndarray]], dict[str, float]]
PAIR_SIDES = ("chosen", "rejected")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree]:
    """``(graphdef, params)`` of a model: the static structure and its parameter pytree."""
    return nnx.split(model)


def make_optimizer(
    *,
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019) with linear warm-up, cosine decay and norm clipping.

    The learning rate rises linearly from 0 to ``learning_rate`` over ``warmup_steps`` and
    decays along a half cosine to 0 at ``num_steps``; gradients are clipped to a global
    norm of ``max_grad_norm`` first (``None`` or 0 disables clipping). The structure of the
    optimiser state does not depend on the values, so a state saved under one setting
    restores under another.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_steps, warmup_steps + 1),
        end_value=0.0,
    )
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity()
    return optax.chain(clip, optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def concat_pairs(batch: Batch, key: str) -> Array:
    """``concat([batch['chosen_<key>'], batch['rejected_<key>']])``: ``[B, ...] -> [2B, ...]``."""
    return jnp.concatenate([batch[f"{side}_{key}"] for side in PAIR_SIDES], axis=0)


def split_pairs(values: Array) -> tuple[Array, Array]:
    """Inverse of :func:`concat_pairs`: ``[2B, ...] -> ([B, ...] chosen, [B, ...] rejected)``."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def pair_sequence_logprobs(
    graphdef: nnx.GraphDef, params: PyTree, batch: Batch
) -> dict[str, Array]:
    """Per-sequence response log-probs of both sides of a preference batch, one forward pass.

    ``log π(y | x) = Σ_t response_mask_t · log π(tokens_t | tokens_<t)`` for the chosen and
    the rejected rows (:func:`rlhf_jax.models.logprobs.sequence_logprobs`).

    Returns:
      ``{"chosen_logps": [B], "rejected_logps": [B], "chosen_lengths": [B],
      "rejected_lengths": [B]}`` (lengths are response token counts).
    """
    model = nnx.merge(graphdef, params)
    response_mask = concat_pairs(batch, "response_mask")
    _, logps = sequence_logprobs(
        model,
        concat_pairs(batch, "input_ids"),
        concat_pairs(batch, "attention_mask"),
        response_mask,
    )
    lengths = jnp.sum(response_mask.astype(jnp.float32), axis=-1)
    chosen_logps, rejected_logps = split_pairs(logps)
    chosen_lengths, rejected_lengths = split_pairs(lengths)
    return {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


def collect(
    forward: ForwardFn,
    arguments: tuple[Any, ...],
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per-example outputs of ``forward(*arguments, batch)`` over a whole data set.

    Args:
      forward: a jitted function returning a dict of ``[B, ...]`` arrays.
      arguments: the leading arguments (parameters).
      arrays: the data set, ``[N, ...]`` arrays.
      batch_size: rows per forward call (every call has this shape).

    Returns:
      The outputs concatenated over the set, ``[N, ...]`` numpy arrays, padding dropped.
    """
    pieces: dict[str, list[np.ndarray]] = {}
    for batch, valid in sequential_batches(dict(arrays), batch_size=batch_size):
        outputs = jax.device_get(forward(*arguments, batch))
        for name, value in outputs.items():
            pieces.setdefault(name, []).append(np.asarray(value)[:valid])
    return {name: np.concatenate(values) for name, values in pieces.items()}


def evaluate(
    forward: ForwardFn,
    arguments: tuple[Any, ...],
    arrays: Mapping[str, np.ndarray],
    summarise: Summariser,
    *,
    batch_size: int,
) -> dict[str, float]:
    """``summarise(collect(forward, arguments, arrays))``: set-level held-out metrics."""
    return summarise(collect(forward, arguments, arrays, batch_size=batch_size))


def host_metrics(metrics: Mapping[str, Array]) -> dict[str, float]:
    """Scalar metrics as Python floats."""
    return {name: float(np.asarray(value)) for name, value in metrics.items()}
