"""Variational Preference Learning: a latent-conditioned reward for a population of users.

Poddar et al. (2024), "Personalizing Reinforcement Learning from Human Feedback with
Variational Preference Learning". Each user ``u`` has a latent preference ``z_u``; the
reward is conditioned on it, ``r(x, y, z)``, and the user's labels follow Bradley–Terry,
``p(y_c ≻ y_r | x, z) = σ(r(x, y_c, z) − r(x, y_r, z))``. An encoder reads a few of the
user's annotated pairs and returns a diagonal Gaussian posterior
``q(z | {(x_k, y_c,k, y_r,k)}) = N(μ, diag(exp(log_var)))``, and the model is trained on the
evidence lower bound (the paper's ELBO)

    ELBO_u = E_{z∼q}[ Σ_k log σ(r(x_k, y_c,k, z) − r(x_k, y_r,k, z)) ] − β KL(q ‖ N(0, I)),

the expectation taken with the reparameterisation ``z = μ + exp(log_var/2) ⊙ ε``,
``ε ∼ N(0, I)`` (Kingma & Welling, 2014). With one user (or with z ignored) it is the
plain Bradley–Terry loss, which averages conflicting users away; with z the model can
represent each group's preference.

This module holds the pure pieces: the Gaussian KL, the reparameterised sample, a small
posterior encoder and latent-conditioned reward as functions of parameter dicts (the
paper's encoder embeds each pair, ``MLP([e(x, y_c), e(x, y_r)])``, and pools the pairs with
self-attention; here the pooling is a masked mean), and the negative ELBO as a loss.
The response embeddings ``e(x, y)`` come from a frozen language model in the paper and
are inputs here. The authors' released code departs from the paper's ELBO in ways this
module does not follow: it clamps μ and log σ² to [−1, 1], scales the sampling noise by
1e-3, rescales z to norm √L, and adds β times the KL summed over the batch's users to
the mean pair loss.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

Params = dict[str, Array]


def gaussian_kl_to_standard_normal(mean: Array, log_var: Array) -> Array:
    """``KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (σ_d² + μ_d² − 1 − log σ_d²)``.

    Args:
      mean: ``[..., L]`` posterior means μ.
      log_var: ``[..., L]`` posterior log-variances log σ².

    Returns:
      ``[...]`` the KL divergence, summed over the latent dimension.
    """
    chex.assert_equal_shape([mean, log_var])
    return 0.5 * jnp.sum(jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var, axis=-1)


def sample_latents(key: Array, mean: Array, log_var: Array, num_samples: int) -> Array:
    """Reparameterised samples ``z_s = μ + exp(log_var / 2) ⊙ ε_s``, ``ε_s ∼ N(0, I)``.

    Args:
      key: PRNG key.
      mean: ``[..., L]`` means.
      log_var: ``[..., L]`` log-variances.
      num_samples: S.

    Returns:
      ``[S, ..., L]`` samples, differentiable in ``mean`` and ``log_var``.
    """
    chex.assert_equal_shape([mean, log_var])
    noise = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    return mean + jnp.exp(0.5 * log_var) * noise


def _dense(key: Array, fan_in: int, fan_out: int) -> tuple[Array, Array]:
    weight = jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(fan_in)
    return weight, jnp.zeros((fan_out,))


def init_posterior_encoder(key: Array, embed_dim: int, hidden_dim: int, latent_dim: int) -> Params:
    """Parameters of :func:`posterior_encoder` (LeCun-normal weights, zero biases)."""
    k_pair, k_mean, k_var = jax.random.split(key, 3)
    pair_w, pair_b = _dense(k_pair, 2 * embed_dim, hidden_dim)
    mean_w, mean_b = _dense(k_mean, hidden_dim, latent_dim)
    var_w, var_b = _dense(k_var, hidden_dim, latent_dim)
    return {
        "pair_w": pair_w,
        "pair_b": pair_b,
        "mean_w": mean_w,
        "mean_b": mean_b,
        "log_var_w": var_w,
        "log_var_b": var_b,
    }


def posterior_encoder(
    params: Params,
    chosen_embeddings: Array,
    rejected_embeddings: Array,
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """Gaussian posterior ``q(z | a user's annotated pairs)``.

    ``h_k = relu(W_p [e_c,k ; e_r,k] + b_p)`` per pair (the order of the concatenation
    carries the label), ``h̄ = Σ_k m_k h_k / Σ_k m_k`` over the user's pairs, then
    ``μ = W_μ h̄ + b_μ`` and ``log σ² = W_v h̄ + b_v``.

    Args:
      params: from :func:`init_posterior_encoder`.
      chosen_embeddings: ``[U, K, E]`` embeddings of the chosen responses of K context
        pairs for each of U users.
      rejected_embeddings: ``[U, K, E]`` embeddings of the rejected responses.
      mask: optional ``[U, K]`` bool, the pairs each user actually annotated.

    Returns:
      ``(mean [U, L], log_var [U, L])``.
    """
    chex.assert_rank([chosen_embeddings, rejected_embeddings], 3)
    chex.assert_equal_shape([chosen_embeddings, rejected_embeddings])
    pairs = jnp.concatenate([chosen_embeddings, rejected_embeddings], axis=-1)
    hidden = jax.nn.relu(pairs @ params["pair_w"] + params["pair_b"])
    if mask is None:
        pooled = jnp.mean(hidden, axis=1)
    else:
        chex.assert_shape(mask, chosen_embeddings.shape[:2])
        weights = mask.astype(hidden.dtype)[..., None]
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    mean = pooled @ params["mean_w"] + params["mean_b"]
    log_var = pooled @ params["log_var_w"] + params["log_var_b"]
    return mean, log_var


def init_latent_reward(key: Array, embed_dim: int, latent_dim: int, hidden_dim: int) -> Params:
    """Parameters of :func:`latent_reward` (LeCun-normal weights, zero biases)."""
    k_hidden, k_out = jax.random.split(key)
    hidden_w, hidden_b = _dense(k_hidden, embed_dim + latent_dim, hidden_dim)
    out_w, out_b = _dense(k_out, hidden_dim, 1)
    return {"hidden_w": hidden_w, "hidden_b": hidden_b, "out_w": out_w, "out_b": out_b}


def latent_reward(params: Params, embeddings: Array, latents: Array) -> Array:
    """Latent-conditioned reward ``r(x, y, z) = w · relu(W [e(x, y) ; z] + b) + c``.

    Args:
      params: from :func:`init_latent_reward`.
      embeddings: ``[..., E]`` response embeddings ``e(x, y)``.
      latents: ``[..., L]`` user latents, broadcastable against ``embeddings``' batch
        dimensions.

    Returns:
      ``[...]`` rewards.
    """
    batch = jnp.broadcast_shapes(embeddings.shape[:-1], latents.shape[:-1])
    inputs = jnp.concatenate(
        [
            jnp.broadcast_to(embeddings, (*batch, embeddings.shape[-1])),
            jnp.broadcast_to(latents, (*batch, latents.shape[-1])),
        ],
        axis=-1,
    )
    hidden = jax.nn.relu(inputs @ params["hidden_w"] + params["hidden_b"])
    return (hidden @ params["out_w"] + params["out_b"])[..., 0]


def vpl_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    mean: Array,
    log_var: Array,
    *,
    beta: float = 1.0,
    free_bits: float = 0.0,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Negative ELBO of VPL, per labelled pair.

    With ``r_s`` the rewards under the s-th reparameterised sample ``z_s ∼ q_u``:

        L = Σ_u [ Σ_k m_uk (1/S) Σ_s ℓ(r_s(y_c,uk) − r_s(y_r,uk)) + β KL(q_u ‖ N(0, I)) ]

    with ``ℓ(z) = −log σ(z)``; ``reduction="mean"`` divides by the number of labelled
    pairs ``Σ m``. Each user's KL is spread evenly over that user's labelled pairs, so
    the loss is a sum of per-pair terms and accumulates over micro-batches of whole
    users. ``β = 0`` with a single sample is the maximum-likelihood (Bradley–Terry) loss
    at those latents.

    ``free_bits = λ > 0`` replaces each user's ``KL`` by ``max(KL, λ)`` (free bits, Kingma
    et al., 2016, "Improved Variational Inference with Inverse Autoregressive Flow", §C.8,
    here per user over the whole latent): the first λ nats of information about the user
    are not charged, which keeps the posterior from collapsing onto the prior before the
    reward has learned to read z. ``λ = 0`` is the paper's ELBO; this is a departure from
    it, off by default.

    Args:
      chosen_rewards: ``[S, U, K]`` rewards ``r(x, y_c, z_s)`` of U users' K pairs under S
        latent samples.
      rejected_rewards: ``[S, U, K]`` rewards of the rejected responses.
      mean: ``[U, L]`` posterior means.
      log_var: ``[U, L]`` posterior log-variances.
      beta: β, the weight of the KL term.
      free_bits: λ, the nats of KL per user that are not charged.
      mask: optional ``[U, K]`` bool, the labelled pairs.
      reduction: ``"mean"`` or ``"sum"`` over labelled pairs.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (labelled pairs), ``"log_likelihood"``
      (mean per pair), ``"kl"`` (mean per user) and ``"accuracy"`` (pairs whose
      sample-mean reward difference is positive).
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 3)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    chex.assert_rank([mean, log_var], 2)
    chex.assert_equal_shape([mean, log_var])
    chex.assert_equal(mean.shape[0], chosen_rewards.shape[1])
    difference = chosen_rewards - rejected_rewards
    nll = jnp.mean(-jax.nn.log_sigmoid(difference), axis=0)
    weights = jnp.ones_like(nll) if mask is None else mask.astype(nll.dtype)
    chex.assert_equal_shape([nll, weights])
    kl = gaussian_kl_to_standard_normal(mean, log_var)
    pairs_per_user = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
    charged = jnp.maximum(kl, free_bits) if free_bits > 0.0 else kl
    per_pair = nll + beta * charged[:, None] / pairs_per_user
    loss, denominator = reduce_loss(per_pair, weights, reduction=reduction)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    mean_difference = jax.lax.stop_gradient(jnp.mean(difference, axis=0))
    return loss, {
        "denominator": denominator,
        "log_likelihood": -jnp.sum(jax.lax.stop_gradient(nll) * weights) / count,
        "kl": jnp.mean(jax.lax.stop_gradient(kl)),
        "accuracy": jnp.sum((mean_difference > 0) * weights) / count,
    }
