"""Reward-model and cost-model steps: pairwise (Bradley–Terry, Safe-RLHF cost) and listwise.

A scalar model (:class:`rlhf_jax.models.ScalarModel`) scores a sequence by its head's value
at the last real token. The losses come from :mod:`rlhf_jax.objectives`:

- ``"bradley_terry"``: ``L = (1 − ε) ℓ(d − m) + ε ℓ(−d − m)``, ``d = s(x, y_w) − s(x, y_l)``,
  ``ℓ(z) = −log σ(z)`` (Bradley & Terry, 1952; Ouyang et al., 2022, eq. 1; the margin m
  of Touvron et al., 2023, eq. 2; label smoothing ε).
- ``"cost"``: the Safe-RLHF cost model (Dai et al., 2023, eq. 6),
  ``L = ℓ(C(y_w) − C(y_l)) + λ[ℓ(s_w C(y_w)) + ℓ(s_l C(y_l))]`` with ``y_w`` the more
  harmful response and ``s = +1`` on unsafe, ``−1`` on safe responses. The batch is a
  harmlessness preference batch (``chosen`` = the safer response) with the flags
  ``chosen_is_safe`` and ``rejected_is_safe``; so ``y_w`` is the rejected row.
- ``"plackett_luce"``: the negative Plackett–Luce log-likelihood of a ranking of K
  responses (Zhu, Jordan & Jiao, 2023, eq. 3) on a batch ``input_ids`` and
  ``attention_mask`` of shape ``[B, K, L]``, each list ordered best first.
- ``"strength"``: Bradley–Terry with per-pair soft labels p and adaptive margins m,
  ``L = p ℓ(d − m) + (1 − p) ℓ(−d − m)`` (Wang et al., 2024, "Secrets of RLHF II", §2),
  reading ``label_probs`` and ``margins`` ``[B]`` from the batch (computed from a
  reward-model ensemble's preference strength; flipped pairs arrive already swapped).
- ``"heron"``: Bradley–Terry on labels ``t ∈ {+1, −1, 0}`` of a hierarchical comparison
  of reward factors (Bukharin et al., HERON), reading ``heron_labels`` ``[B]``;
  unlabelled pairs (``t = 0``) carry no loss.
- ``"binary_feedback"``: the class-weighted cross-entropy of P[Love] = σ(s) on both rows
  of each pair (Han et al., 2025, RLUF), reading the binary ``chosen_feedback`` and
  ``rejected_feedback`` ``[B]``; its denominator counts responses, not pairs.

Wang et al. (2024, "Secrets of RLHF II", §3) add a contrastive term to the pairwise loss,
``L = L_rm + β · L_cl``. With ``contrastive_weight = β > 0`` the pair batch goes through the
model twice with residual dropout (``dropout_rate``), under the keys
:func:`dropout_view_keys` derives from the step's key; ``L_rm`` is computed on the first
view's scores and ``L_cl`` is the SimCSE InfoNCE loss of the difference representations
``h_c − h_r`` (last-token hidden states), each pair's second view its positive and the
other pairs of the (micro-)batch its negatives
(:func:`rlhf_jax.objectives.reward_strength.preference_contrastive_loss`). Both terms are
summed over pairs and share the pair denominator, so accumulation divides them alike;
the contrastive term is offered for the losses whose denominator counts pairs
(``CONTRASTIVE_LOSSES``). ``dropout_rate > 0`` alone trains with dropout on one view.

The chosen and rejected rows (or the K rows of a list) go through the model in one
forward pass. Metrics include ``accuracy``: the fraction of pairs the model orders like
the label (``s_chosen > s_rejected``; for the cost model ``C(rejected) > C(chosen)``; for
lists, the best response scored highest).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.objectives.binary_feedback import weighted_binary_cross_entropy
from rlhf_jax.objectives.heron import heron_reward_loss
from rlhf_jax.objectives.listwise import plackett_luce_loss
from rlhf_jax.objectives.reward_model import bradley_terry_loss, cost_model_loss
from rlhf_jax.objectives.reward_strength import (
    preference_contrastive_loss,
    strength_reward_loss,
)
from rlhf_jax.train.state import Metrics, PyTree, SumLossFn, TrainState, make_gradient_step
from rlhf_jax.train.steps.common import (
    Batch,
    Evaluator,
    StepFn,
    concat_pairs,
    evaluate,
    host_metrics,
    split_pairs,
)

RewardLoss = Literal[
    "bradley_terry", "cost", "plackett_luce", "strength", "heron", "binary_feedback"
]
REWARD_LOSSES = ("bradley_terry", "cost", "plackett_luce", "strength", "heron", "binary_feedback")
SAFETY_FLAGS = ("chosen_is_safe", "rejected_is_safe")
PAIR_FIELDS: dict[str, tuple[str, ...]] = {
    "cost": SAFETY_FLAGS,
    "strength": ("label_probs", "margins"),
    "heron": ("heron_labels",),
    "binary_feedback": ("chosen_feedback", "rejected_feedback"),
}
"""Per-pair ``[B]`` batch arrays each loss reads besides the two rows."""
CONTRASTIVE_LOSSES = ("bradley_terry", "cost", "strength")
"""Pairwise losses whose denominator counts pairs, to which the contrastive term can be added."""


def pair_scores(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: Batch,
    *,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> tuple[Array, Array]:
    """``(s_chosen [B], s_rejected [B])`` from one forward pass over both rows of each pair."""
    model = nnx.merge(graphdef, params)
    scores = model.score(
        concat_pairs(batch, "input_ids"),
        concat_pairs(batch, "attention_mask"),
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
    )
    return split_pairs(scores)


def pair_scores_and_representations(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: Batch,
    *,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> dict[str, Array]:
    """Scores ``[B]`` and last-token representations ``[B, E]`` of both rows of each pair.

    One forward pass over ``[2B, L]``
    (:meth:`rlhf_jax.models.ScalarModel.score_and_representation`).

    Returns:
      ``{"chosen_scores", "rejected_scores", "chosen_repr", "rejected_repr"}``; the
      representations in float32.
    """
    model = nnx.merge(graphdef, params)
    scores, representations = model.score_and_representation(
        concat_pairs(batch, "input_ids"),
        concat_pairs(batch, "attention_mask"),
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
    )
    chosen, rejected = split_pairs(scores)
    chosen_repr, rejected_repr = split_pairs(representations.astype(jnp.float32))
    return {
        "chosen_scores": chosen,
        "rejected_scores": rejected,
        "chosen_repr": chosen_repr,
        "rejected_repr": rejected_repr,
    }


def list_scores(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: Batch,
    *,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """Scores ``[B, K]`` of ranked lists ``input_ids [B, K, L]``, one forward over ``[B·K, L]``."""
    model = nnx.merge(graphdef, params)
    B, K, L = batch["input_ids"].shape
    flat = model.score(
        batch["input_ids"].reshape(B * K, L),
        batch["attention_mask"].reshape(B * K, L),
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
    )
    return flat.reshape(B, K)


def dropout_view_keys(rng: Array) -> tuple[Array, Array]:
    """Dropout keys of the two views of a batch: ``(fold_in(rng, 0), fold_in(rng, 1))``.

    The first view feeds the reward loss (it is the only view without the contrastive
    term); the second supplies the contrastive positives.
    """
    return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)


def reward_objective(
    scores: dict[str, Array],
    *,
    loss: RewardLoss,
    margin: float = 0.0,
    label_smoothing: float = 0.0,
    sign_weight: float = 1.0,
    positive_weight: float = 1.0,
    negative_weight: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[Array, Metrics]:
    """The named objective on model scores (and per-pair fields), with an ``accuracy`` metric.

    Args:
      scores: ``chosen_scores`` and ``rejected_scores`` ``[B]`` with the loss's
        ``PAIR_FIELDS``, or ``ranked_scores`` ``[B, K]``.
      loss: one of ``REWARD_LOSSES``.
      margin: Bradley–Terry margin m.
      label_smoothing: Bradley–Terry label smoothing ε.
      sign_weight: weight λ of the Safe-RLHF sign term.
      positive_weight: binary feedback's weight w₊ of the positive class.
      negative_weight: binary feedback's weight w₋ of the negative class.
      reduction: ``"mean"`` or ``"sum"`` over pairs or lists.

    Returns:
      ``(loss, metrics)`` with ``denominator`` and ``accuracy``.
    """
    if loss == "bradley_terry":
        return bradley_terry_loss(
            scores["chosen_scores"],
            scores["rejected_scores"],
            margin=margin,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
    if loss == "cost":
        return cost_model_loss(
            scores["rejected_scores"],
            scores["chosen_scores"],
            ~scores["rejected_is_safe"].astype(bool),
            ~scores["chosen_is_safe"].astype(bool),
            sign_weight=sign_weight,
            reduction=reduction,
        )
    if loss == "plackett_luce":
        value, metrics = plackett_luce_loss(scores["ranked_scores"], reduction=reduction)
        return value, {**metrics, "accuracy": metrics["top1_accuracy"]}
    if loss == "strength":
        return strength_reward_loss(
            scores["chosen_scores"],
            scores["rejected_scores"],
            label_probs=scores["label_probs"],
            margin=scores["margins"],
            reduction=reduction,
        )
    if loss == "heron":
        return heron_reward_loss(
            scores["chosen_scores"],
            scores["rejected_scores"],
            scores["heron_labels"],
            reduction=reduction,
        )
    if loss == "binary_feedback":
        return weighted_binary_cross_entropy(
            jnp.concatenate([scores["chosen_scores"], scores["rejected_scores"]]),
            jnp.concatenate([scores["chosen_feedback"], scores["rejected_feedback"]]),
            positive_weight=positive_weight,
            negative_weight=negative_weight,
            reduction=reduction,
        )
    raise ValueError(f"reward loss must be one of {REWARD_LOSSES}, got {loss!r}")


def model_scores(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: Batch,
    loss: RewardLoss,
    *,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> dict[str, Array]:
    """The scores (and per-pair fields) :func:`reward_objective` needs for ``loss``."""
    dropout = {"dropout_rate": dropout_rate, "dropout_key": dropout_key}
    if loss == "plackett_luce":
        return {"ranked_scores": list_scores(graphdef, params, batch, **dropout)}
    chosen, rejected = pair_scores(graphdef, params, batch, **dropout)
    scores = {"chosen_scores": chosen, "rejected_scores": rejected}
    scores.update({name: batch[name] for name in PAIR_FIELDS.get(loss, ())})
    return scores


def check_dropout_options(
    loss: str, *, contrastive_weight: float, contrastive_temperature: float, dropout_rate: float
) -> None:
    """Raise ``ValueError`` naming the option when the dropout/contrastive settings conflict."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if contrastive_weight < 0.0:
        raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
    if contrastive_temperature <= 0.0:
        raise ValueError(f"contrastive_temperature must be > 0, got {contrastive_temperature}")
    if contrastive_weight > 0.0 and loss not in CONTRASTIVE_LOSSES:
        raise ValueError(
            f"contrastive_weight > 0 needs a loss whose denominator counts pairs, one of "
            f"{CONTRASTIVE_LOSSES}; got loss={loss!r}"
        )
    if contrastive_weight > 0.0 and dropout_rate == 0.0:
        raise ValueError(
            "contrastive_weight > 0 needs dropout_rate > 0: the two views of a pair differ "
            "only by their dropout masks"
        )


def reward_sum_loss(
    graphdef: nnx.GraphDef,
    *,
    loss: RewardLoss = "bradley_terry",
    margin: float = 0.0,
    label_smoothing: float = 0.0,
    sign_weight: float = 1.0,
    positive_weight: float = 1.0,
    negative_weight: float = 1.0,
    contrastive_weight: float = 0.0,
    contrastive_temperature: float = 0.05,
    dropout_rate: float = 0.0,
) -> SumLossFn:
    """``loss_fn(params, batch, rng) -> (summed loss, metrics)`` of a scalar model.

    With ``contrastive_weight = β > 0`` the summed loss is
    ``Σ_i ℓ_rm(view 1)_i + β Σ_i ℓ_cl,i`` (module docstring), with the metrics
    ``contrastive_loss`` (mean ``ℓ_cl`` over the pairs) and ``contrastive_accuracy``.
    With ``dropout_rate > 0`` the forward uses dropout under ``dropout_view_keys(rng)[0]``;
    with both at 0 the ``rng`` is unused and the loss is the deterministic one.
    """
    if loss not in REWARD_LOSSES:
        raise ValueError(f"reward loss must be one of {REWARD_LOSSES}, got {loss!r}")
    check_dropout_options(
        loss,
        contrastive_weight=contrastive_weight,
        contrastive_temperature=contrastive_temperature,
        dropout_rate=dropout_rate,
    )
    hyper = {
        "loss": loss,
        "margin": margin,
        "label_smoothing": label_smoothing,
        "sign_weight": sign_weight,
        "positive_weight": positive_weight,
        "negative_weight": negative_weight,
        "reduction": "sum",
    }

    def loss_fn(params: PyTree, batch: Batch, rng: Array) -> tuple[Array, Metrics]:
        if dropout_rate == 0.0:
            del rng
            return reward_objective(model_scores(graphdef, params, batch, loss), **hyper)
        first_key, second_key = dropout_view_keys(rng)
        if contrastive_weight == 0.0:
            scores = model_scores(
                graphdef, params, batch, loss, dropout_rate=dropout_rate, dropout_key=first_key
            )
            return reward_objective(scores, **hyper)
        first, second = (
            pair_scores_and_representations(
                graphdef, params, batch, dropout_rate=dropout_rate, dropout_key=key
            )
            for key in (first_key, second_key)
        )
        scores = {name: first[name] for name in ("chosen_scores", "rejected_scores")}
        scores.update({name: batch[name] for name in PAIR_FIELDS.get(loss, ())})
        rm_sum, metrics = reward_objective(scores, **hyper)
        contrastive_sum, contrastive = preference_contrastive_loss(
            first["chosen_repr"],
            first["rejected_repr"],
            second["chosen_repr"],
            second["rejected_repr"],
            temperature=contrastive_temperature,
            reduction="sum",
        )
        metrics = {
            **metrics,
            "contrastive_loss": jax.lax.stop_gradient(contrastive_sum) / contrastive["denominator"],
            "contrastive_accuracy": contrastive["accuracy"],
        }
        return rm_sum + contrastive_weight * contrastive_sum, metrics

    return loss_fn


def make_reward_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss: RewardLoss = "bradley_terry",
    margin: float = 0.0,
    label_smoothing: float = 0.0,
    sign_weight: float = 1.0,
    positive_weight: float = 1.0,
    negative_weight: float = 1.0,
    contrastive_weight: float = 0.0,
    contrastive_temperature: float = 0.05,
    dropout_rate: float = 0.0,
    num_micro_batches: int = 1,
) -> StepFn:
    """The pure reward- or cost-model step ``step(state, batch, rng) -> (state, metrics)``.

    Args:
      graphdef: the scalar model's graph definition (static).
      tx: the optax transformation of ``state.opt_state``.
      loss: ``"bradley_terry"`` (reward model), ``"cost"`` (Safe-RLHF cost model),
        ``"plackett_luce"`` (ranked lists), ``"strength"``, ``"heron"`` or
        ``"binary_feedback"`` (module docstring).
      margin: Bradley–Terry margin m.
      label_smoothing: Bradley–Terry label smoothing ε.
      sign_weight: Safe-RLHF sign-term weight λ.
      positive_weight: binary feedback's w₊.
      negative_weight: binary feedback's w₋.
      contrastive_weight: β of the Secrets-II contrastive term (0 = none); needs
        ``dropout_rate > 0`` and a loss of ``CONTRASTIVE_LOSSES``.
      contrastive_temperature: the InfoNCE temperature τ (SimCSE's 0.05 by default).
      dropout_rate: residual dropout of the model during training (0 = none).
      num_micro_batches: micro-batches for gradient accumulation (the contrastive
        negatives of a pair are the other pairs of its micro-batch).

    Returns:
      The step (jit it once, state donated). Metrics: ``loss`` (including the
      contrastive term), ``accuracy``, the objective's own metrics, ``grad_norm``,
      ``nonfinite``, ``denominator``; with the contrastive term also
      ``contrastive_loss`` and ``contrastive_accuracy``.
    """
    return make_gradient_step(
        reward_sum_loss(
            graphdef,
            loss=loss,
            margin=margin,
            label_smoothing=label_smoothing,
            sign_weight=sign_weight,
            positive_weight=positive_weight,
            negative_weight=negative_weight,
            contrastive_weight=contrastive_weight,
            contrastive_temperature=contrastive_temperature,
            dropout_rate=dropout_rate,
        ),
        tx,
        num_micro_batches=num_micro_batches,
    )


def make_reward_eval(
    graphdef: nnx.GraphDef,
    *,
    batch_size: int,
    loss: RewardLoss = "bradley_terry",
    margin: float = 0.0,
    label_smoothing: float = 0.0,
    sign_weight: float = 1.0,
    positive_weight: float = 1.0,
    negative_weight: float = 1.0,
) -> Evaluator:
    """``evaluate(state, arrays) -> metrics``: the objective on a whole held-out set.

    Scores every pair (or list) with a forward pass jitted once, then evaluates the
    objective once on all of them: ``loss``, ``accuracy`` and the objective's metrics.
    """

    @jax.jit
    def forward(params: PyTree, batch: Batch) -> dict[str, Array]:
        return model_scores(graphdef, params, batch, loss)

    keys = ("input_ids", "attention_mask")
    if loss != "plackett_luce":
        keys = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in keys)
        keys += PAIR_FIELDS.get(loss, ())

    def summarise(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        value, metrics = reward_objective(
            {k: jnp.asarray(v) for k, v in outputs.items()},
            loss=loss,
            margin=margin,
            label_smoothing=label_smoothing,
            sign_weight=sign_weight,
            positive_weight=positive_weight,
            negative_weight=negative_weight,
        )
        return host_metrics({"loss": value, **metrics})

    def evaluator(state: TrainState, arrays) -> dict[str, float]:
        data = {k: arrays[k] for k in keys}
        return evaluate(forward, (state.params,), data, summarise, batch_size=batch_size)

    return evaluator
