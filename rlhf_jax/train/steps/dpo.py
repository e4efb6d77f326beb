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

Losses are selected by name in one registry, :data:`PREFERENCE_LOSSES`: every loss of
``PAIRWISE_LOSSES`` plus the losses that read more than the pair (:class:`PreferenceLoss`):

- ``"cpl"``: Contrastive Preference Learning (Hejna et al., 2023, §3.1) on one-step
  segments, ``ℓ(α a_w − λ α a_l)`` (:func:`one_step_cpl_loss`); with λ = 1 it is DPO with
  β = α.
- ``"selm"``: SELM's optimism-biased DPO (Zhang et al., 2024, §4),
  ``ℓ(β h) + α β log π(y_ref)/π_ref(y_ref)``, reading a response ``y_ref ∼ π_ref`` per
  pair from the batch's ``explore_*`` rows; its reference log-prob comes from the
  reference like the pair's (``ref_explore_logps`` when precomputed).
- ``"rationale_dpo"``: DPO plus the rationale NLL (Just et al., 2024),
  ``ℓ(β h) − γ log π(r | x, y_w, y_l)/|r|``, reading the rationale rows ``rationale_*``
  (the context ``x, y_w, y_l`` as prompt, the rationale as response) and the flag
  ``has_rationale`` from the batch. The rationale log-likelihood is length-normalised.

An extra group ``g`` is a block ``g_input_ids``, ``g_attention_mask``, ``g_response_mask``
``[B, L_g]`` aligned with the pairs; its per-sequence log-probs take one more forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.objectives.cpl import cpl_loss
from rlhf_jax.objectives.pairwise import PAIRWISE_LOSSES, PairwiseLoss
from rlhf_jax.objectives.rationale import rationale_dpo_loss
from rlhf_jax.objectives.reduction import Reduction
from rlhf_jax.objectives.selm import selm_loss
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
SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask")
PAIR_KEYS = tuple(f"{side}_{key}" for side in PAIR_SIDES for key in SEQUENCE_KEYS)


def one_step_cpl_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    alpha: float = 0.1,
    conservative_bias: float = 1.0,
) -> tuple[Array, Metrics]:
    """CPL on one-step segments (a whole response is one action), uniform pairwise signature.

    ``ℓ(α a_w − λ α a_l)`` with ``a = log π(y|x) − log π_ref(y|x)`` (Hejna et al., 2023,
    §3.1-3.2, :func:`rlhf_jax.objectives.cpl.cpl_loss` with ``T = 1`` and reference
    log-probs). With ``λ = 1`` this is ``pairwise.dpo_loss`` with ``β = α``. Metrics are
    DPO's names for the same quantities: implicit rewards ``α a``, their margin and the
    reward accuracy.
    """
    del chosen_lengths, rejected_lengths
    loss, metrics = cpl_loss(
        policy_chosen_logps[:, None],
        policy_rejected_logps[:, None],
        ref_chosen_logps=ref_chosen_logps[:, None],
        ref_rejected_logps=ref_rejected_logps[:, None],
        alpha=alpha,
        conservative_bias=conservative_bias,
        reduction=reduction,
    )
    return loss, {
        "denominator": metrics["denominator"],
        "chosen_rewards": metrics["chosen_scores"],
        "rejected_rewards": metrics["rejected_scores"],
        "reward_margin": metrics["chosen_scores"] - metrics["rejected_scores"],
        "reward_accuracy": metrics["accuracy"],
    }


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """A loss the DPO step trains, and the inputs it reads beyond the pair.

    Attributes:
      fn: a loss with the uniform pairwise signature of :mod:`rlhf_jax.objectives.pairwise`
        (extra keyword inputs allowed).
      groups: extra response groups of the batch whose policy log-probs the loss reads
        (``<group>_logps`` and ``<group>_lengths``).
      reference_groups: the groups whose reference log-probs it also reads
        (``ref_<group>_logps``).
      flags: per-pair batch arrays ``[B]`` it reads.
      inputs: maps the computed log-probs, lengths and flags to the loss's keywords.
    """

    fn: PairwiseLoss
    groups: tuple[str, ...] = ()
    reference_groups: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    inputs: Callable[[Mapping[str, Array]], dict[str, Array]] = lambda values: {}

    def group_keys(self) -> tuple[str, ...]:
        """Batch keys of the extra groups' rows."""
        return tuple(f"{group}_{key}" for group in self.groups for key in SEQUENCE_KEYS)

    def reference_keys(self) -> tuple[str, ...]:
        """Batch keys of precomputed reference log-probs (pair and extra groups)."""
        return (*REFERENCE_KEYS, *(f"ref_{group}_logps" for group in self.reference_groups))


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    **{name: PreferenceLoss(fn) for name, fn in PAIRWISE_LOSSES.items()},
    "cpl": PreferenceLoss(one_step_cpl_loss),
    "selm": PreferenceLoss(
        selm_loss,
        groups=("explore",),
        reference_groups=("explore",),
        inputs=lambda v: {
            "policy_explore_logps": v["explore_logps"],
            "ref_explore_logps": v["ref_explore_logps"],
        },
    ),
    "rationale_dpo": PreferenceLoss(
        rationale_dpo_loss,
        groups=("rationale",),
        flags=("has_rationale",),
        inputs=lambda v: {
            "rationale_logps": v["rationale_logps"],
            "rationale_lengths": v["rationale_lengths"],
            "has_rationale": v["has_rationale"],
        },
    ),
}
"""Every loss the DPO step can train, by ``loss_name``."""


def _check_loss(loss_name: str, reference: str) -> PreferenceLoss:
    if loss_name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown pairwise loss {loss_name!r}; known: {sorted(PREFERENCE_LOSSES)}")
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    return PREFERENCE_LOSSES[loss_name]


def group_sequence_logprobs(
    graphdef: nnx.GraphDef, params: PyTree, batch: Batch, group: str
) -> dict[str, Array]:
    """``{"<group>_logps": [B], "<group>_lengths": [B]}`` of an extra group's rows."""
    response_mask = batch[f"{group}_response_mask"]
    _, logps = sequence_logprobs(
        nnx.merge(graphdef, params),
        batch[f"{group}_input_ids"],
        batch[f"{group}_attention_mask"],
        response_mask,
    )
    lengths = jnp.sum(response_mask.astype(jnp.float32), axis=-1)
    return {f"{group}_logps": logps, f"{group}_lengths": lengths}


def policy_logps(
    graphdef: nnx.GraphDef, params: PyTree, batch: Batch, spec: PreferenceLoss
) -> dict[str, Array]:
    """The pair's per-sequence log-probs and lengths and those of the loss's extra groups."""
    logps = pair_sequence_logprobs(graphdef, params, batch)
    for group in spec.groups:
        logps.update(group_sequence_logprobs(graphdef, params, batch, group))
    return logps


def reference_logps(
    graphdef: nnx.GraphDef,
    reference_params: PyTree,
    batch: Batch,
    spec: PreferenceLoss = PREFERENCE_LOSSES["dpo"],
) -> dict[str, Array]:
    """Reference log-probs ``[B]`` under frozen params: the pair's and ``spec``'s groups'.

    Keys ``ref_chosen_logps``, ``ref_rejected_logps`` and ``ref_<group>_logps`` for each
    of ``spec.reference_groups``.
    """
    frozen = jax.lax.stop_gradient(reference_params)
    logps = pair_sequence_logprobs(graphdef, frozen, batch)
    out = {
        "ref_chosen_logps": logps["chosen_logps"],
        "ref_rejected_logps": logps["rejected_logps"],
    }
    for group in spec.reference_groups:
        values = group_sequence_logprobs(graphdef, frozen, batch, group)
        out[f"ref_{group}_logps"] = values[f"{group}_logps"]
    return out


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
    """``PREFERENCE_LOSSES[loss_name]`` on the log-probs, lengths and flags in ``logps``."""
    spec = PREFERENCE_LOSSES[loss_name]
    return spec.fn(
        logps["chosen_logps"],
        logps["rejected_logps"],
        logps["ref_chosen_logps"],
        logps["ref_rejected_logps"],
        chosen_lengths=logps["chosen_lengths"],
        rejected_lengths=logps["rejected_lengths"],
        reduction=reduction,
        **spec.inputs(logps),
        **hyper,
    )


def _missing(batch: Batch, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if key not in batch]


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
      loss_name: a key of ``PREFERENCE_LOSSES``.
      hyper: the loss's keyword hyper-parameters (``beta``, ``label_smoothing``, ...).
      reference: ``"in_step"`` (``state.extra["reference_params"]``) or
        ``"precomputed"`` (``ref_chosen_logps``/``ref_rejected_logps``, and
        ``ref_<group>_logps`` of the loss's reference groups, in the batch).
      num_micro_batches: micro-batches for gradient accumulation.

    Returns:
      The step (jit it once, state donated). Metrics: ``loss``, the loss's metrics
      (implicit ``chosen_rewards``, ``rejected_rewards``, ``reward_margin``,
      ``reward_accuracy``), ``grad_norm``, ``nonfinite``, ``denominator``.
    """
    spec = _check_loss(loss_name, reference)
    if loss_name == "aot_pair" and num_micro_batches > 1:
        raise ValueError("aot_pair couples the pairs of a batch; use num_micro_batches=1")
    hyper = dict(hyper or {})
    stateful = STATEFUL_HYPER.get(loss_name, ())
    data_keys = (*PAIR_KEYS, *spec.group_keys(), *spec.flags)
    reference_keys = spec.reference_keys()

    def step(state: TrainState, batch: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        if missing := _missing(batch, data_keys):
            raise ValueError(f"loss {loss_name!r} needs {missing} in the batch")
        if reference == "precomputed" and (missing := _missing(batch, reference_keys)):
            raise ValueError(
                f"reference='precomputed' needs {missing} in the batch "
                "(see precompute_reference_logps)"
            )
        kept = (*data_keys, *(reference_keys if reference == "precomputed" else ()))
        micro_batches = split_micro_batches({k: batch[k] for k in kept}, num_micro_batches)
        if reference == "in_step":
            reference_params = state.extra["reference_params"]
            micro_batches = {
                **micro_batches,
                **jax.lax.map(
                    lambda mb: reference_logps(graphdef, reference_params, mb, spec),
                    micro_batches,
                ),
            }
        full_hyper = {**hyper, **{name: state.extra[name] for name in stateful}}

        def loss_fn(params: PyTree, micro_batch: Batch, key: Array) -> tuple[Array, Metrics]:
            del key
            logps = {**policy_logps(graphdef, params, micro_batch, spec), **micro_batch}
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
    loss_name: str = "dpo",
) -> dict[str, np.ndarray]:
    """A copy of a preference data set with the reference log-probs ``loss_name`` reads.

    ``ref_chosen_logps``, ``ref_rejected_logps`` and ``ref_<group>_logps`` of the loss's
    reference groups; one jitted forward pass per ``batch_size`` pairs (compiled once), so
    a run with ``reference="precomputed"`` never evaluates the reference while training.
    """
    spec = _check_loss(loss_name, "precomputed")
    forward = _reference_forward(graphdef, spec)
    data = {k: arrays[k] for k in (*PAIR_KEYS, *spec.group_keys())}
    return {**arrays, **collect(forward, (reference_params,), data, batch_size=batch_size)}


def _reference_forward(graphdef: nnx.GraphDef, spec: PreferenceLoss) -> ForwardFn:
    """:func:`reference_logps` jitted for ``graphdef`` and the loss's groups."""
    return jax.jit(lambda params, batch: reference_logps(graphdef, params, batch, spec))


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
    The held-out arrays carry the loss's extra groups and flags like the training data.
    """
    spec = _check_loss(loss_name, reference)
    hyper = dict(hyper or {})
    stateful = STATEFUL_HYPER.get(loss_name, ())
    policy_forward = jax.jit(lambda params, batch: policy_logps(graphdef, params, batch, spec))
    ref_forward = _reference_forward(graphdef, spec)
    reference_keys = spec.reference_keys()

    def evaluator(state: TrainState, arrays) -> dict[str, float]:
        data = {k: arrays[k] for k in (*PAIR_KEYS, *spec.group_keys())}
        if reference == "in_step":
            params = (state.extra["reference_params"],)
            references = collect(ref_forward, params, data, batch_size=batch_size)
        else:
            references = {k: arrays[k] for k in reference_keys}
        logps = {
            **collect(policy_forward, (state.params,), data, batch_size=batch_size),
            **references,
            **{k: arrays[k] for k in spec.flags},
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
