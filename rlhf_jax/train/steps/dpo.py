"""The direct-alignment step: DPO and every loss of ``PAIRWISE_LOSSES``, selected by name.

With ``a_w = log π(y_w|x) − log π_ref(y_w|x)`` and ``a_l`` likewise, DPO minimises
``ℓ(β(a_w − a_l))``, ``ℓ(z) = −log σ(z)`` (Rafailov et al., 2023, eq. 7); the family in
:mod:`rlhf_jax.objectives.pairwise` (IPO, SLiC, SimPO, ORPO, ...) shares its signature, so
the step is the same for all of them: one forward pass of the policy over the chosen and
rejected rows concatenated gives the four per-sequence log-probs' policy half and the
response lengths; the reference half comes either

- from the frozen reference parameters in ``state.extra["reference_params"]``
  (``reference="in_step"``): one forward pass per micro-batch under
  ``lax.stop_gradient``, before the gradient is taken, so the reference costs one
  gradient-free pass per batch; or
- from the batch (``reference="precomputed"``): ``ref_chosen_logps`` and
  ``ref_rejected_logps`` ``[B]``, filled in once for a whole data set by
  :func:`precompute_reference_logps`.

The two give the same step. A loss with state carries it in ``state.extra``: BCO's reward
shift δ (``"bco_pair"``) enters the loss as a constant and is replaced after each step by
the update the loss reports (averaged over micro-batches). AOT's loss couples the pairs
of a batch through a sort, so it does not decompose over micro-batches and is refused with
more than one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.objectives.pairwise import PAIRWISE_LOSSES
from rlhf_jax.train.state import (
    Metrics,
    PyTree,
    TrainState,
    accumulate_gradients,
    split_micro_batches,
)
from rlhf_jax.train.steps.common import (
    PAIR_SIDES,
    Batch,
    Evaluator,
    ForwardFn,
    StepFn,
    collect,
    host_metrics,
    pair_sequence_logprobs,
)

ReferenceMode = Literal["in_step", "precomputed"]
REFERENCE_MODES = ("in_step", "precomputed")
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
STATEFUL_HYPER: Mapping[str, tuple[str, ...]] = {"bco_pair": ("reward_shift",)}
"""Loss hyper-parameters that are state: read from ``state.extra``, updated from metrics."""
PAIR_KEYS = tuple(
    f"{side}_{key}"
    for side in PAIR_SIDES
    for key in ("input_ids", "attention_mask", "response_mask")
)


def _check_loss(loss_name: str, reference: str) -> None:
    if loss_name not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown pairwise loss {loss_name!r}; known: {sorted(PAIRWISE_LOSSES)}")
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")


def reference_logps(
    graphdef: nnx.GraphDef, reference_params: PyTree, batch: Batch
) -> dict[str, Array]:
    """``{"ref_chosen_logps", "ref_rejected_logps"}`` ``[B]`` under frozen reference params."""
    logps = pair_sequence_logprobs(graphdef, jax.lax.stop_gradient(reference_params), batch)
    return {
        "ref_chosen_logps": logps["chosen_logps"],
        "ref_rejected_logps": logps["rejected_logps"],
    }


def initial_dpo_extra(
    loss_name: str, *, reference: ReferenceMode, reference_params: PyTree | None = None
) -> dict[str, Any]:
    """``state.extra`` a DPO-family run starts with.

    Holds ``reference_params`` for ``reference="in_step"`` and the loss's stateful
    hyper-parameters (BCO's ``reward_shift`` = 0).
    """
    _check_loss(loss_name, reference)
    extra: dict[str, Any] = {
        name: jnp.zeros((), jnp.float32) for name in STATEFUL_HYPER.get(loss_name, ())
    }
    if reference == "in_step":
        if reference_params is None:
            raise ValueError("reference='in_step' needs reference_params")
        extra["reference_params"] = reference_params
    return extra


def pairwise_objective(
    logps: Mapping[str, Array],
    *,
    loss_name: str,
    hyper: Mapping[str, Any],
    reduction: Literal["mean", "sum"],
) -> tuple[Array, Metrics]:
    """``PAIRWISE_LOSSES[loss_name]`` on policy and reference log-probs and response lengths."""
    return PAIRWISE_LOSSES[loss_name](
        logps["chosen_logps"],
        logps["rejected_logps"],
        logps["ref_chosen_logps"],
        logps["ref_rejected_logps"],
        chosen_lengths=logps["chosen_lengths"],
        rejected_lengths=logps["rejected_lengths"],
        reduction=reduction,
        **hyper,
    )


def make_dpo_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss_name: str = "dpo",
    hyper: Mapping[str, Any] | None = None,
    reference: ReferenceMode = "in_step",
    num_micro_batches: int = 1,
) -> StepFn:
    """The pure DPO-family step ``step(state, batch, rng) -> (state, metrics)``.

    Args:
      graphdef: the policy's graph definition (the reference has the same one).
      tx: the optax transformation of ``state.opt_state``.
      loss_name: a key of ``PAIRWISE_LOSSES``.
      hyper: the loss's keyword hyper-parameters (``beta``, ``label_smoothing``, ...).
      reference: ``"in_step"`` (``state.extra["reference_params"]``) or
        ``"precomputed"`` (``ref_chosen_logps``/``ref_rejected_logps`` in the batch).
      num_micro_batches: micro-batches for gradient accumulation.

    Returns:
      The step (jit it once, state donated). Metrics: ``loss``, the loss's metrics
      (implicit ``chosen_rewards``, ``rejected_rewards``, ``reward_margin``,
      ``reward_accuracy``), ``grad_norm``, ``nonfinite``, ``denominator``.
    """
    _check_loss(loss_name, reference)
    if loss_name == "aot_pair" and num_micro_batches > 1:
        raise ValueError("aot_pair couples the pairs of a batch; use num_micro_batches=1")
    hyper = dict(hyper or {})
    stateful = STATEFUL_HYPER.get(loss_name, ())

    def step(state: TrainState, batch: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        if reference == "precomputed" and not set(REFERENCE_KEYS) <= set(batch):
            raise ValueError(
                f"reference='precomputed' needs {REFERENCE_KEYS} in the batch "
                "(see precompute_reference_logps)"
            )
        batch = {k: batch[k] for k in (*PAIR_KEYS, *REFERENCE_KEYS) if k in batch}
        micro_batches = split_micro_batches(batch, num_micro_batches)
        if reference == "in_step":
            reference_params = state.extra["reference_params"]
            micro_batches = {
                **micro_batches,
                **jax.lax.map(
                    lambda mb: reference_logps(graphdef, reference_params, mb), micro_batches
                ),
            }
        full_hyper = {**hyper, **{name: state.extra[name] for name in stateful}}

        def loss_fn(params: PyTree, micro_batch: Batch, key: Array) -> tuple[Array, Metrics]:
            del key
            logps = {**pair_sequence_logprobs(graphdef, params, micro_batch), **micro_batch}
            return pairwise_objective(logps, loss_name=loss_name, hyper=full_hyper, reduction="sum")

        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches, rng)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        state = state.replace(extra={**state.extra, **{name: metrics[name] for name in stateful}})
        return state, {**metrics, **guard, "loss": loss}

    return step


def precompute_reference_logps(
    graphdef: nnx.GraphDef,
    reference_params: PyTree,
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """A copy of a preference data set with ``ref_chosen_logps`` and ``ref_rejected_logps``.

    One jitted forward pass per ``batch_size`` pairs (compiled once), so a run with
    ``reference="precomputed"`` never evaluates the reference while training.
    """
    forward = _reference_forward(graphdef)
    data = {k: arrays[k] for k in PAIR_KEYS}
    return {**arrays, **collect(forward, (reference_params,), data, batch_size=batch_size)}


def _reference_forward(graphdef: nnx.GraphDef) -> ForwardFn:
    """:func:`reference_logps` jitted for ``graphdef``."""
    return jax.jit(lambda params, batch: reference_logps(graphdef, params, batch))


def make_dpo_eval(
    graphdef: nnx.GraphDef,
    *,
    batch_size: int,
    loss_name: str = "dpo",
    hyper: Mapping[str, Any] | None = None,
    reference: ReferenceMode = "in_step",
) -> Evaluator:
    """``evaluate(state, arrays) -> metrics`` on a held-out preference set.

    Computes the policy's (and, for ``"in_step"``, the reference's) per-sequence log-probs
    over the set with forwards jitted once, then evaluates the loss once on all pairs:
    ``loss``, ``reward_accuracy`` (pairs whose implicit reward ``β a_w`` exceeds ``β a_l``),
    ``reward_margin``, ``chosen_rewards``, ``rejected_rewards`` and the loss's metrics.
    """
    _check_loss(loss_name, reference)
    hyper = dict(hyper or {})
    stateful = STATEFUL_HYPER.get(loss_name, ())
    policy_forward = jax.jit(lambda params, batch: pair_sequence_logprobs(graphdef, params, batch))
    ref_forward = _reference_forward(graphdef)

    def evaluator(state: TrainState, arrays) -> dict[str, float]:
        data = {k: arrays[k] for k in PAIR_KEYS}
        if reference == "in_step":
            params = (state.extra["reference_params"],)
            data.update(collect(ref_forward, params, data, batch_size=batch_size))
        else:
            data.update({k: arrays[k] for k in REFERENCE_KEYS})
        logps = {
            **collect(policy_forward, (state.params,), data, batch_size=batch_size),
            **{k: data[k] for k in REFERENCE_KEYS},
        }
        full_hyper = {**hyper, **{name: state.extra[name] for name in stateful}}
        loss, metrics = pairwise_objective(
            {k: jnp.asarray(v) for k, v in logps.items()},
            loss_name=loss_name,
            hyper=full_hyper,
            reduction="mean",
        )
        return host_metrics({"loss": loss, **metrics})

    return evaluator
