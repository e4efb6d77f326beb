"""Scalar heads: value, reward and cost models on a decoder trunk.

A scalar model maps the final-normed hidden state ``h_t`` of every token to
``v_t = wᵀ h_t + b`` (a ``Linear(E → 1)``), giving per-token scalars ``[B, T]``. A value
model (PPO's critic, Schulman et al. 2017) reads every position; a reward or cost model
(Ouyang et al. 2022; Dai et al. 2023, Safe RLHF) scores a sequence by the scalar at its
last real token (:func:`sequence_score`). :class:`PolicyWithValueHead` shares one trunk
between the policy's logits and a value head, so one forward pass yields both.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from flax import nnx
from jax import Array

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Decoder, logical_param


class ScalarHead(nnx.Module):
    """``v = h · w + b`` with ``w [E, 1] ('embed', None)`` and ``b [1] (None,)``.

    The kernel starts at ``N(0, 1/(E + 1))`` (unit-variance outputs for unit-variance
    features) and the bias at zero.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E = config.hidden_size
        param_dtype = jnp.dtype(config.param_dtype)
        self.kernel = logical_param(
            rngs, (E, 1), ("embed", None), param_dtype, nnx.initializers.normal((E + 1) ** -0.5)
        )
        self.bias = logical_param(None, (1,), (None,), param_dtype, nnx.initializers.zeros)

    def __call__(self, hidden: Array) -> Array:
        """Float32 scalars ``[B, T]`` from hidden states ``[B, T, E]``."""
        chex.assert_rank(hidden, 3)
        scalars = jnp.einsum(
            "bte,eo->bto",
            hidden,
            self.kernel[...].astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )
        return scalars[..., 0] + self.bias[...].astype(jnp.float32)[0]


class ScalarModel(nnx.Module):
    """A decoder trunk with its own scalar head: value, reward or cost model.

    Args:
      config: trunk architecture.
      rngs: random streams for initialisation.
      trunk: an existing decoder whose parameters the model starts from (e.g. an
        imported or SFT checkpoint); a fresh one is built when ``None``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, trunk: Decoder | None = None):
        if trunk is not None and trunk.config != config:
            raise ValueError("ScalarModel trunk: its config differs from the config given.")
        self.trunk = trunk if trunk is not None else Decoder(config, rngs=rngs)
        self.head = ScalarHead(config, rngs=rngs)

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> Array:
        """Per-token scalars ``[B, T]`` (float32) for ``tokens [B, T]``.

        ``dropout_rate`` and ``dropout_key`` switch on the trunk's residual dropout
        (:meth:`rlhf_jax.models.Decoder.__call__`); the default is the deterministic model.
        """
        hidden = self.trunk.hidden(
            tokens,
            positions=positions,
            attention_mask=attention_mask,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )
        return self.head(hidden)

    def score(
        self,
        tokens: Array,
        attention_mask: Array,
        *,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> Array:
        """Sequence scores ``[B]``: the scalar at each sequence's last real token.

        ``dropout_rate`` and ``dropout_key`` as in :meth:`__call__`.
        """
        scalars = self(
            tokens,
            attention_mask=attention_mask,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )
        return sequence_score(scalars, attention_mask)

    def score_and_representation(
        self,
        tokens: Array,
        attention_mask: Array,
        *,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> tuple[Array, Array]:
        """Sequence scores and the representation the head reads, from one trunk pass.

        The representation of sequence ``b`` is its final-normed hidden state at the last
        real token, ``h_b = hidden[b, last(b)]``, so ``score_b = wᵀ h_b + b₀``: the
        feature on which Wang et al. (2024, "Secrets of RLHF II", §3) put the contrastive
        loss.

        Args:
          tokens: ``[B, T]`` int32 token ids.
          attention_mask: ``[B, T]``, true/1 on real tokens (either padding side).
          dropout_rate: residual dropout probability of the trunk (0 = deterministic).
          dropout_key: PRNG key of the dropout masks, needed when ``dropout_rate > 0``.

        Returns:
          ``(scores [B] float32, representations [B, E] in the compute dtype)``.
        """
        hidden = self.trunk.hidden(
            tokens,
            attention_mask=attention_mask,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )
        scores = sequence_score(self.head(hidden), attention_mask)
        return scores, last_token_features(hidden, attention_mask)


class PolicyWithValueHead(nnx.Module):
    """A policy decoder and a value head sharing its trunk.

    Args:
      config: trunk architecture.
      rngs: random streams for initialisation.
      policy: an existing decoder to wrap; a fresh one is built when ``None``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, policy: Decoder | None = None):
        if policy is not None and policy.config != config:
            raise ValueError(
                "PolicyWithValueHead policy: its config differs from the config given."
            )
        self.policy = policy if policy is not None else Decoder(config, rngs=rngs)
        self.value_head = ScalarHead(config, rngs=rngs)

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """``(logits [B, T, V], values [B, T])``, both float32, from one trunk pass."""
        hidden = self.policy.hidden(tokens, positions=positions, attention_mask=attention_mask)
        return self.policy.logits_from_hidden(hidden), self.value_head(hidden)


def last_token_index(attention_mask: Array) -> Array:
    """Index ``[B]`` of the last position whose mask is set (0 for an all-zero row)."""
    chex.assert_rank(attention_mask, 2)
    T = attention_mask.shape[1]
    indices = jnp.arange(T, dtype=jnp.int32)
    return jnp.max(jnp.where(attention_mask.astype(jnp.bool_), indices, 0), axis=1)


def sequence_score(scalars: Array, attention_mask: Array) -> Array:
    """The scalar at each sequence's last real token: ``r_b = v[b, last(b)]``.

    Works for left and right padding alike.

    Args:
      scalars: ``[B, T]`` per-token scalars.
      attention_mask: ``[B, T]``, true/1 on real tokens.

    Returns:
      ``[B]`` sequence scores.
    """
    chex.assert_equal_shape((scalars, attention_mask))
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(scalars, index[:, None], axis=1)[:, 0]


def last_token_features(hidden: Array, attention_mask: Array) -> Array:
    """The feature vector at each sequence's last real token: ``h_b = hidden[b, last(b)]``.

    Args:
      hidden: ``[B, T, E]`` per-token features.
      attention_mask: ``[B, T]``, true/1 on real tokens.

    Returns:
      ``[B, E]`` features, indexed like :func:`sequence_score`.
    """
    chex.assert_rank(hidden, 3)
    chex.assert_equal_shape_prefix((hidden, attention_mask), 2)
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
