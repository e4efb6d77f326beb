"""Variational Preference Learning on a decoder trunk: the training step and its evaluation.

Poddar et al. (2024), "Personalizing Reinforcement Learning from Human Feedback with
Variational Preference Learning". The embedding of a response is the decoder trunk's
final-normed hidden state at the sequence's last real token, ``e(x, y) = h_last(x, y)``,
and the gradients of the loss flow into the trunk, trained end to end with the VPL heads;
or the trunk is frozen, as the paper freezes its language model (below).

A batch holds U users. User u brings K *context* pairs ``(y_c,uk, y_r,uk)`` from which the
posterior encoder (:func:`rlhf_jax.objectives.vpl.posterior_encoder`) infers
``q_u(z) = N(μ_u, diag σ_u²)``, and Q *query* pairs scored by the latent-conditioned
reward ``r(x, y, z) = MLP([e(x, y); z])`` under S reparameterised samples
``z_s = μ_u + σ_u ⊙ ε_s``. The loss is the negative ELBO per labelled query pair
(:func:`rlhf_jax.objectives.vpl.vpl_loss`)

    L = Σ_u [ Σ_q (1/S) Σ_s −log σ(r(y_c,uq, z_s) − r(y_r,uq, z_s)) + β KL(q_u ‖ N(0, I)) ]
        / (U Q).

Batch layout (``L`` tokens per row): ``{context,query}_{chosen,rejected}_{input_ids,
attention_mask}`` of shapes ``[U, K, L]`` (context) and ``[U, Q, L]`` (query). Every
sequence of the batch goes through the trunk in one forward pass.

The evaluation scores each user's query pairs under the posterior mean ``z = μ_u`` (the
paper's deterministic prediction) and reports per-user accuracy and KL.

Frozen trunk (the paper's setting): with ``graphdef=None`` the step, loss and evaluation
take ``params = {"encoder", "reward"}`` and batches of embeddings
``{context,query}_{chosen,rejected}`` ``[U, K or Q, E]`` gathered from embeddings
computed once by :func:`embed_pairs`, so training touches only the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.heads import last_token_index
from rlhf_jax.objectives.reduction import Reduction
from rlhf_jax.objectives.vpl import (
    gaussian_kl_to_standard_normal,
    init_latent_reward,
    init_posterior_encoder,
    latent_reward,
    posterior_encoder,
    sample_latents,
    vpl_loss,
)
from rlhf_jax.train.state import Metrics, PyTree, SumLossFn, TrainState, make_gradient_step
from rlhf_jax.train.steps.common import Batch, StepFn, collect

PAIR_SETS = ("context", "query")
SIDES = ("chosen", "rejected")
TOKEN_FIELDS = ("input_ids", "attention_mask")
BATCH_KEYS = tuple(f"{s}_{side}_{f}" for s in PAIR_SETS for side in SIDES for f in TOKEN_FIELDS)
"""The ``[U, K or Q, L]`` arrays of a VPL batch."""
EMBEDDING_KEYS = tuple(f"{s}_{side}" for s in PAIR_SETS for side in SIDES)
"""The ``[U, K or Q, E]`` arrays of a frozen-trunk VPL batch."""

UserEvaluator = Callable[[TrainState, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def init_vpl_params(
    key: Array,
    trunk_params: PyTree,
    *,
    embed_dim: int,
    hidden_dim: int,
    latent_dim: int,
) -> dict[str, PyTree]:
    """``{"trunk", "encoder", "reward"}``: a decoder's params and fresh VPL heads.

    Args:
      key: PRNG key of the heads.
      trunk_params: the decoder's parameter pytree (``nnx.split`` of a ``Decoder``).
      embed_dim: E, the trunk's hidden size.
      hidden_dim: hidden width of the encoder's pair MLP and of the reward MLP.
      latent_dim: L, the latent dimension.

    Returns:
      The parameter pytree a VPL step trains.
    """
    k_encoder, k_reward = jax.random.split(key)
    return {
        "trunk": trunk_params,
        "encoder": init_posterior_encoder(k_encoder, embed_dim, hidden_dim, latent_dim),
        "reward": init_latent_reward(k_reward, embed_dim, latent_dim, hidden_dim),
    }


def sequence_embeddings(
    graphdef: nnx.GraphDef, trunk_params: PyTree, input_ids: Array, attention_mask: Array
) -> Array:
    """``e(x, y) = h_last [B, E]``: the final-normed hidden state at the last real token.

    Args:
      graphdef: the decoder's graph definition.
      trunk_params: the decoder's parameters.
      input_ids: ``[B, T]`` token ids.
      attention_mask: ``[B, T]``, true on real tokens.

    Returns:
      ``[B, E]`` float32 embeddings.
    """
    chex.assert_equal_shape([input_ids, attention_mask])
    decoder = nnx.merge(graphdef, trunk_params)
    hidden = decoder.hidden(input_ids, attention_mask=attention_mask)
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def pair_embeddings(graphdef: nnx.GraphDef, trunk_params: PyTree, batch: Batch) -> dict[str, Array]:
    """Embeddings of every sequence of a VPL batch from one trunk forward pass.

    Returns:
      ``{"<set>_<side>": [U, K or Q, E]}`` for set in (context, query) and side in
      (chosen, rejected).
    """
    names = [f"{s}_{side}" for s in PAIR_SETS for side in SIDES]
    shapes = [batch[f"{name}_input_ids"].shape for name in names]
    for name, shape in zip(names, shapes, strict=True):
        chex.assert_rank(batch[f"{name}_input_ids"], 3)
        chex.assert_shape(batch[f"{name}_attention_mask"], shape)
    chex.assert_equal_shape_prefix([batch[f"{n}_input_ids"] for n in names], 1)
    flat = {
        field: jnp.concatenate(
            [batch[f"{n}_{field}"].reshape(-1, s[-1]) for n, s in zip(names, shapes, strict=True)]
        )
        for field in TOKEN_FIELDS
    }
    embeddings = sequence_embeddings(
        graphdef, trunk_params, flat["input_ids"], flat["attention_mask"]
    )
    sizes = np.cumsum([s[0] * s[1] for s in shapes])[:-1]
    pieces = jnp.split(embeddings, sizes)
    return {
        name: piece.reshape(*shape[:2], -1)
        for name, piece, shape in zip(names, pieces, shapes, strict=True)
    }


def vpl_objective(
    params: PyTree,
    embeddings: Mapping[str, Array],
    key: Array,
    *,
    beta: float,
    num_samples: int,
    free_bits: float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[Array, Metrics]:
    """The negative ELBO of the query pairs given the context pairs' posterior.

    Args:
      params: ``{"encoder", "reward", ...}`` (the trunk is not read).
      embeddings: from :func:`pair_embeddings`.
      key: PRNG key of the reparameterised samples.
      beta: β, the weight of ``KL(q_u ‖ N(0, I))``.
      num_samples: S latent samples per user.
      free_bits: λ of :func:`rlhf_jax.objectives.vpl.vpl_loss` (0 = the paper's ELBO).
      reduction: ``"mean"`` or ``"sum"`` over query pairs.

    Returns:
      :func:`rlhf_jax.objectives.vpl.vpl_loss`'s ``(loss, metrics)``.
    """
    mean, log_var = posterior_encoder(
        params["encoder"], embeddings["context_chosen"], embeddings["context_rejected"]
    )
    latents = sample_latents(key, mean, log_var, num_samples)[:, :, None, :]
    chosen = latent_reward(params["reward"], embeddings["query_chosen"], latents)
    rejected = latent_reward(params["reward"], embeddings["query_rejected"], latents)
    return vpl_loss(
        chosen, rejected, mean, log_var, beta=beta, free_bits=free_bits, reduction=reduction
    )


def batch_embeddings(graphdef: nnx.GraphDef | None, params: PyTree, batch: Batch) -> Batch:
    """The batch's embeddings: from ``params["trunk"]``, or the batch itself when frozen."""
    if graphdef is None:
        return {name: batch[name] for name in EMBEDDING_KEYS}
    return pair_embeddings(graphdef, params["trunk"], batch)


def embed_pairs(
    graphdef: nnx.GraphDef,
    trunk_params: PyTree,
    pairs: Mapping[str, np.ndarray],
    *,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Embeddings ``{"chosen", "rejected"}`` ``[N, E]`` of N preference pairs, each once.

    ``pairs`` holds ``{chosen,rejected}_{input_ids,attention_mask}`` ``[N, L]``. One jitted
    trunk forward (:func:`sequence_embeddings`) per ``batch_size`` pairs. A frozen-trunk
    run embeds its pool of pairs once and draws users' batches of embeddings from it, so
    a pair shared by many users is embedded only once.
    """

    def forward(params: PyTree, batch: Batch) -> dict[str, Array]:
        return {
            side: sequence_embeddings(
                graphdef, params, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
            )
            for side in SIDES
        }

    keys = [f"{side}_{field}" for side in SIDES for field in TOKEN_FIELDS]
    return collect(
        jax.jit(forward), (trunk_params,), {k: pairs[k] for k in keys}, batch_size=batch_size
    )


def vpl_sum_loss(
    graphdef: nnx.GraphDef | None, *, beta: float, num_samples: int, free_bits: float = 0.0
) -> SumLossFn:
    """``loss_fn(params, batch, rng) -> (summed negative ELBO, metrics)``.

    ``graphdef=None``: the trunk is frozen and ``batch`` holds embeddings (module docstring).
    """

    def loss_fn(params: PyTree, batch: Batch, rng: Array) -> tuple[Array, Metrics]:
        return vpl_objective(
            params,
            batch_embeddings(graphdef, params, batch),
            rng,
            beta=beta,
            num_samples=num_samples,
            free_bits=free_bits,
            reduction="sum",
        )

    return loss_fn


def make_vpl_step(
    graphdef: nnx.GraphDef | None,
    tx: optax.GradientTransformation,
    *,
    beta: float = 1.0,
    num_samples: int = 1,
    free_bits: float = 0.0,
    num_micro_batches: int = 1,
) -> StepFn:
    """The pure VPL step ``step(state, batch, rng) -> (state, metrics)``.

    ``state.params`` is :func:`init_vpl_params`'s ``{"trunk", "encoder", "reward"}``; all
    three are trained. With ``graphdef=None`` the trunk is frozen: ``state.params`` is
    ``{"encoder", "reward"}`` and batches hold embeddings (:func:`embed_pairs`). Micro-batches
    split the users.

    Args:
      graphdef: the decoder's graph definition (static), or ``None`` for a frozen trunk.
      tx: the optax transformation of ``state.opt_state``.
      beta: β of the ELBO.
      num_samples: S latent samples per user.
      free_bits: λ, the uncharged nats of KL per user (0 = the paper's ELBO).
      num_micro_batches: micro-batches (of whole users) for gradient accumulation.

    Returns:
      The step. Metrics: ``loss``, ``log_likelihood``, ``kl``, ``accuracy`` (under the
      samples), ``grad_norm``, ``nonfinite``, ``denominator`` (query pairs).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return make_gradient_step(
        vpl_sum_loss(graphdef, beta=beta, num_samples=num_samples, free_bits=free_bits),
        tx,
        num_micro_batches=num_micro_batches,
    )


def posterior_mean_predictions(
    graphdef: nnx.GraphDef | None, params: PyTree, batch: Batch
) -> dict[str, Array]:
    """Each user's query pairs scored at the posterior mean ``z = μ_u``.

    ``graphdef=None``: the trunk is frozen and ``batch`` holds embeddings.

    Returns:
      ``{"correct": [U, Q]`` (``r(y_c, μ_u) > r(y_r, μ_u)``), ``"accuracy": [U]``,
      ``"kl": [U]`` (``KL(q_u ‖ N(0, I))``), ``"mean": [U, L]``}.
    """
    embeddings = batch_embeddings(graphdef, params, batch)
    mean, log_var = posterior_encoder(
        params["encoder"], embeddings["context_chosen"], embeddings["context_rejected"]
    )
    chosen = latent_reward(params["reward"], embeddings["query_chosen"], mean[:, None, :])
    rejected = latent_reward(params["reward"], embeddings["query_rejected"], mean[:, None, :])
    correct = chosen > rejected
    return {
        "correct": correct,
        "accuracy": jnp.mean(correct.astype(jnp.float32), axis=1),
        "kl": gaussian_kl_to_standard_normal(mean, log_var),
        "mean": mean,
    }


def make_vpl_eval(graphdef: nnx.GraphDef | None, *, batch_size: int) -> UserEvaluator:
    """``evaluate(state, users) -> per-user arrays`` of :func:`posterior_mean_predictions`.

    The forward is jitted once and run over the users in fixed-size batches
    (``batch_size`` users each); the outputs are numpy arrays with one row per user.
    """
    forward = jax.jit(lambda params, batch: posterior_mean_predictions(graphdef, params, batch))

    def evaluator(state: TrainState, users: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = {k: users[k] for k in (EMBEDDING_KEYS if graphdef is None else BATCH_KEYS)}
        return collect(forward, (state.params,), data, batch_size=batch_size)

    return evaluator
