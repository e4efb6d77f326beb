"""Token log-probabilities of a causal language model.

For logits ``z_t`` predicting token ``t+1``, ``log π(y | ·) = z_y − logsumexp(z)``.
:func:`response_logprobs` aligns the result with the tokens themselves: entry ``t`` is
``log π(tokens[t] | tokens[<t])``, so it can be multiplied by a ``response_mask`` that
marks response tokens, and summed into the sequence log-probability
``log π(y | x) = Σ_t response_mask_t · log π(tokens_t | tokens_<t)``.

Inside a pure jitted step the model arrives as a ``(graphdef, params)`` pair::

    def step(state, batch, rng):
        def loss_fn(params):
            policy = nnx.merge(graphdef, params)
            per_token, per_sequence = sequence_logprobs(
                policy, batch["tokens"], batch["attention_mask"], batch["response_mask"]
            )
            ...
        grads = jax.grad(loss_fn)(state.params)

A policy with a value head (:class:`~rlhf_jax.models.heads.PolicyWithValueHead`) returns
``(logits, values)`` from one pass; feed its logits to :func:`response_logprobs`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.models.transformer import Decoder


def token_logprobs(logits: Array, targets: Array) -> Array:
    """``log softmax(logits)[b, t, targets[b, t]]``, computed in float32.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer token ids.

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape_prefix((logits, targets), 2)
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def response_logprobs(logits: Array, tokens: Array, response_mask: Array) -> tuple[Array, Array]:
    """Per-token log-probs aligned with ``tokens`` and their masked per-sequence sum.

    Args:
      logits: ``[B, L, V]`` model outputs for ``tokens`` (``logits[:, t]`` predicts
        ``tokens[:, t + 1]``).
      tokens: ``[B, L]`` prompt-and-response token ids.
      response_mask: ``[B, L]``, 1 exactly on response tokens (0 on prompt and padding).

    Returns:
      ``(per_token [B, L], per_sequence [B])``: ``per_token[:, t] =
      log π(tokens[t] | tokens[<t]) · response_mask[:, t]`` for ``t ≥ 1``,
      ``per_token[:, 0] = 0``, and ``per_sequence = Σ_t per_token[:, t]``.
    """
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape((tokens, response_mask))
    chex.assert_equal_shape_prefix((logits, tokens), 2)
    shifted = token_logprobs(logits[:, :-1], tokens[:, 1:])
    per_token = jnp.pad(shifted, ((0, 0), (1, 0)))
    mask = jnp.asarray(response_mask, jnp.float32).at[:, 0].set(0.0)
    per_token = per_token * mask
    return per_token, jnp.sum(per_token, axis=1)


def sequence_logprobs(
    model: Decoder, tokens: Array, attention_mask: Array, response_mask: Array
) -> tuple[Array, Array]:
    """Run ``model`` on a (prompt, response) batch and return :func:`response_logprobs`.

    Positions follow the attention mask (``max(cumsum(mask) − 1, 0)``), so left- and
    right-padded batches give the same log-probs as unpadded sequences.

    Args:
      model: a :class:`Decoder` (in a pure step: ``nnx.merge(graphdef, params)``).
      tokens: ``[B, L]`` int32 token ids.
      attention_mask: ``[B, L]``, 1 on real tokens.
      response_mask: ``[B, L]``, 1 exactly on response tokens.

    Returns:
      ``(per_token [B, L], per_sequence [B])`` as in :func:`response_logprobs`.
    """
    logits, _ = model(tokens, attention_mask=attention_mask)
    return response_logprobs(logits, tokens, response_mask)
