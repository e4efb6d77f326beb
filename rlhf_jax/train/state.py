"""The training state pytree, gradient accumulation and the non-finite guard.

A training step is a pure function ``step(state, batch, rng) -> (state, metrics)``. Its
state is one pytree, :class:`TrainState`, holding the parameters, the optax optimiser
state, the number of completed steps, a PRNG key and a dictionary of algorithm state
(a KL coefficient, a Lagrange multiplier, ...). The model's graph definition and the
optax transformation are static and live in the step's closure, never in the state, so
the state is plain data that can be checkpointed and restored onto another mesh.

Gradient accumulation follows the ``reduction="sum"`` convention of
:mod:`rlhf_jax.objectives.reduction`: each micro-batch contributes the gradient of its
*summed* loss ``∇ Σ_i ℓ_i`` and its denominator ``D_m``; the update uses

    g = (Σ_m ∇ Σ_{i∈m} ℓ_i) / (Σ_m D_m),

which is the gradient of the mean loss of the whole batch, so eight micro-batches of one
give exactly the update of one batch of eight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import Array

PyTree = Any
Metrics = dict[str, Array]
SumLossFn = Callable[[PyTree, PyTree, Array], tuple[Array, Metrics]]


def _as_key_data(rng: Array | int) -> Array:
    """Raw ``uint32`` key data for an int seed, a raw key or a typed key."""
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: int32 scalar, the number of training steps completed. The loop driver
        advances it after each call of the step function; it is also the data position
        (the next batch is ``batch_for_step(step)``).
      params: the trainable parameters (e.g. the ``nnx.Param`` state of a split model).
      opt_state: the optax state of ``params``.
      rng: raw ``uint32`` PRNG key data; the loop derives the key of step ``t`` as
        ``fold_in(rng, t)``, so a run restarted from a checkpoint draws the same keys.
      extra: algorithm state as a dict of arrays (KL coefficient, Lagrange multiplier,
        a frozen reference model's params, ...).
    """

    step: Array
    params: PyTree
    opt_state: PyTree
    rng: Array
    extra: dict[str, PyTree]

    @classmethod
    def create(
        cls,
        params: PyTree,
        tx: optax.GradientTransformation,
        rng: Array | int,
        extra: Mapping[str, PyTree] | None = None,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)`` as the optimiser state.

        Args:
          params: trainable parameters.
          tx: the optax transformation the step will use (it is not stored).
          rng: an int seed, a raw key (``jax.random.PRNGKey``) or a typed key.
          extra: algorithm state; values are converted to arrays.

        Returns:
          The initial :class:`TrainState`.
        """
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=_as_key_data(rng),
            extra=jax.tree.map(jnp.asarray, dict(extra or {})),
        )

    def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation) -> TrainState:
        """One optax update ``params ← params + tx.update(grads)`` (no guard, step unchanged).

        Args:
          grads: gradients with the structure of ``params``.
          tx: the optax transformation ``opt_state`` was created with.

        Returns:
          The state with new ``params`` and ``opt_state``.
        """
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state)

    def apply_finite_gradients(
        self, grads: PyTree, tx: optax.GradientTransformation, *, loss: Array
    ) -> tuple[TrainState, Metrics]:
        """Apply ``grads`` only when the loss and the gradient norm are finite.

        When ``loss`` or ``‖grads‖₂`` is NaN or infinite, the returned state keeps the
        old ``params`` and ``opt_state`` (selected leaf by leaf with ``jnp.where``), so one
        bad batch never poisons the state.

        Args:
          grads: gradients with the structure of ``params``.
          tx: the optax transformation ``opt_state`` was created with.
          loss: the scalar loss the gradients belong to.

        Returns:
          ``(state, metrics)`` with ``metrics["grad_norm"]`` (float32) and
          ``metrics["nonfinite"]`` (bool, ``True`` when the update was skipped).
        """
        chex.assert_rank(loss, 0)
        grad_norm = optax.tree.norm(grads).astype(jnp.float32)
        nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        updated = self.apply_gradients(grads, tx)
        keep_old = lambda old, new: jnp.where(nonfinite, old, new)  # noqa: E731
        guarded = self.replace(
            params=jax.tree.map(keep_old, self.params, updated.params),
            opt_state=jax.tree.map(keep_old, self.opt_state, updated.opt_state),
        )
        return guarded, {"grad_norm": grad_norm, "nonfinite": nonfinite}


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
    """Reshape every leaf ``[B, ...]`` of ``batch`` to ``[M, B // M, ...]``.

    Args:
      batch: a pytree of arrays sharing the leading batch dimension ``B``.
      num_micro_batches: ``M``; must divide ``B``.

    Returns:
      The batch with a leading micro-batch axis, ready for :func:`accumulate_gradients`.
    """
    leaves = jax.tree.leaves(batch)
    chex.assert_equal_shape_prefix(leaves, 1)
    size = leaves[0].shape[0]
    if size % num_micro_batches:
        raise ValueError(
            f"batch size {size} is not divisible by num_micro_batches={num_micro_batches}"
        )
    return jax.tree.map(
        lambda x: x.reshape(num_micro_batches, size // num_micro_batches, *x.shape[1:]), batch
    )


def accumulate_gradients(
    loss_fn: SumLossFn,
    params: PyTree,
    micro_batches: PyTree,
    rng: Array,
    *,
    denominator: Array | None = None,
) -> tuple[Array, PyTree, Metrics]:
    """Gradient of the batch-mean loss, accumulated over micro-batches with ``lax.scan``.

    ``loss_fn(params, micro_batch, rng) -> (loss_sum, metrics)`` must use
    ``reduction="sum"`` and report ``metrics["denominator"]`` (as every objective does).
    Micro-batch ``m`` gets the key ``fold_in(rng, m)``.

    Args:
      loss_fn: summed loss of one micro-batch and its metrics.
      params: the parameters to differentiate.
      micro_batches: a pytree whose leaves have a leading micro-batch axis ``[M, ...]``
        (see :func:`split_micro_batches`).
      rng: PRNG key for the whole batch.
      denominator: the total denominator ``Σ_m D_m``; by default the sum of the
        micro-batches' ``metrics["denominator"]``.

    Returns:
      ``(loss, grads, metrics)``: ``loss = Σ_m L_m / D`` and ``grads = Σ_m ∇L_m / D``;
      ``metrics["denominator"] = D``; every other metric is averaged over micro-batches.
      Sums are accumulated in at least float32; ``grads`` take the dtype of ``params``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_micro_batch(carry, inputs):
        loss_sum, grad_sum = carry
        index, micro_batch = inputs
        (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        chex.assert_rank(loss, 0)
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grad_sum, grads)
        return (loss_sum + loss.astype(jnp.float32), grad_sum), metrics

    num_micro_batches = jax.tree.leaves(micro_batches)[0].shape[0]
    zeros_f32 = lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))  # noqa: E731
    init = (jnp.zeros((), jnp.float32), jax.tree.map(zeros_f32, params))
    (loss_sum, grad_sum), per_micro = jax.lax.scan(
        one_micro_batch, init, (jnp.arange(num_micro_batches), micro_batches)
    )
    if "denominator" not in per_micro:
        raise KeyError("loss_fn must report metrics['denominator'] (use reduction='sum')")
    total = jnp.sum(per_micro["denominator"]) if denominator is None else denominator
    total = jnp.maximum(jnp.asarray(total, jnp.float32), jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grad_sum, params)
    metrics = {k: jnp.mean(v, axis=0) for k, v in per_micro.items() if k != "denominator"}
    metrics["denominator"] = total
    return loss_sum / total, grads, metrics


def make_gradient_step(
    loss_fn: SumLossFn,
    tx: optax.GradientTransformation,
    *,
    num_micro_batches: int = 1,
) -> Callable[[TrainState, PyTree, Array], tuple[TrainState, Metrics]]:
    """A guarded, accumulating gradient step on ``state.params`` for a summed loss.

    This is the generic building block of supervised steps: split the batch into
    micro-batches, accumulate ``∇ Σ ℓ / D`` (:func:`accumulate_gradients`) and apply it
    unless the loss or the gradient is non-finite (:meth:`TrainState.apply_finite_gradients`).

    Args:
      loss_fn: ``loss_fn(params, micro_batch, rng) -> (loss_sum, metrics)`` with
        ``metrics["denominator"]``.
      tx: the optax transformation.
      num_micro_batches: number of micro-batches each batch is split into.

    Returns:
      ``step(state, batch, rng) -> (state, metrics)`` with ``metrics`` holding ``loss``,
      ``grad_norm``, ``nonfinite``, ``denominator`` and the loss's own metrics.
    """

    def step(state: TrainState, batch: PyTree, rng: Array) -> tuple[TrainState, Metrics]:
        micro_batches = split_micro_batches(batch, num_micro_batches)
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches, rng)
        state, guard_metrics = state.apply_finite_gradients(grads, tx, loss=loss)
        return state, {**metrics, **guard_metrics, "loss": loss}

    return step
