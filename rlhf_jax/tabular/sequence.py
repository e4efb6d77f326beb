"""A tabular sequence model: token-level policies over a few tokens and steps, exactly.

A sequence is ``y = (y_0, ..., y_{T-1})`` with tokens in ``{0..V-1}``. A token-level policy
is a table of logits ``[T, P, V]`` with ``P = V^{T-1}``: row ``[t, c]`` holds the logits
of ``π(y_t | y_<t)`` for the prefix whose base-V code is ``c = Σ_{i<t} y_i V^{t-1-i}``
(rows with ``c ≥ V^t`` are unused). All ``V^T`` sequences are enumerated, so sequence
probabilities ``π(y) = Π_t π(y_t | y_<t)``, prefix probabilities and expectations are
exact, and a sequence-level distribution can be turned back into its token conditionals.

``soft_optimal_token_logp`` gives the token conditionals of the KL-regularised optimum
``π*(y) ∝ π_ref(y) exp(Σ_t r_t(y_<t, y_t)/β)`` by the backward soft Bellman recursion
``π*(a|s) ∝ π_ref(a|s) exp((r(s, a) + V(s a))/β)``,
``V(s) = β log Σ_a π_ref(a|s) exp((r(s, a) + V(s a))/β)``; it equals the token conditionals
of ``core.kl_regularised_optimum`` over the enumerated sequences.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


def all_sequences(num_tokens: int, length: int) -> Array:
    """All ``V^T`` sequences, ``[V^T, T]`` int32, in lexicographic (base-V) order."""
    return jnp.asarray(list(itertools.product(range(num_tokens), repeat=length)), jnp.int32)


def prefix_codes(num_tokens: int, length: int) -> Array:
    """``[V^T, T]``: entry ``[n, t]`` is the base-V code of sequence n's prefix ``y_<t``."""
    sequences = np.asarray(all_sequences(num_tokens, length))
    codes = np.zeros_like(sequences)
    for t in range(1, length):
        codes[:, t] = codes[:, t - 1] * num_tokens + sequences[:, t - 1]
    return jnp.asarray(codes)


def _shape(token_table: Array) -> tuple[int, int]:
    chex.assert_rank(token_table, 3)
    length, num_prefixes, num_tokens = token_table.shape
    if num_prefixes != num_tokens ** (length - 1):
        raise ValueError(
            f"token table must be [T, V^(T-1), V]; got {token_table.shape} "
            f"(expected middle axis {num_tokens ** (length - 1)})"
        )
    return num_tokens, length


def token_log_probs(token_logits: Array) -> Array:
    """``log π(y_t | y_<t)`` for every sequence and step, ``[V^T, T]``."""
    num_tokens, length = _shape(token_logits)
    logp = jax.nn.log_softmax(token_logits, axis=-1)
    sequences = all_sequences(num_tokens, length)
    codes = prefix_codes(num_tokens, length)
    return logp[jnp.arange(length), codes, sequences]


def sequence_log_probs(token_logits: Array) -> Array:
    """``log π(y) = Σ_t log π(y_t | y_<t)`` for every sequence, ``[V^T]``."""
    return jnp.sum(token_log_probs(token_logits), axis=-1)


def prefix_probs(token_logits: Array) -> Array:
    """``[T, V^(T-1)]``: the probability under π of reaching each prefix at step t.

    Row t sums to one over its first ``V^t`` entries (zeros elsewhere).
    """
    num_tokens, length = _shape(token_logits)
    per_step = token_log_probs(token_logits)
    reach = jnp.exp(jnp.cumsum(per_step, axis=-1) - per_step)  # Π_{i<t} π(y_i|y_<i)
    codes = prefix_codes(num_tokens, length)
    # every prefix of step t is shared by V^(T-t) sequences: count it once
    share = num_tokens ** (length - jnp.arange(length))
    table = jnp.zeros((length, num_tokens ** (length - 1)))
    return table.at[jnp.arange(length), codes].add(reach / share)


def token_conditionals(sequence_logp: Array, num_tokens: int, length: int) -> Array:
    """Token conditionals ``log p(y_t | y_<t)`` of a sequence distribution, ``[T, V^(T-1), V]``.

    ``p(y_t = a | s) = p(s a ·) / p(s ·)`` by marginalising the enumerated sequences; unused
    rows (and prefixes of probability zero) are filled with a uniform distribution.
    """
    chex.assert_shape(sequence_logp, (num_tokens**length,))
    sequences = all_sequences(num_tokens, length)
    codes = prefix_codes(num_tokens, length)
    probs = jnp.exp(sequence_logp)
    rows = []
    for t in range(length):
        mass = jax.ops.segment_sum(
            probs, codes[:, t] * num_tokens + sequences[:, t], num_segments=num_tokens**length
        ).reshape(-1, num_tokens)
        total = jnp.sum(mass, axis=-1, keepdims=True)
        uniform = jnp.full_like(mass, 1.0 / num_tokens)
        rows.append(jnp.log(jnp.where(total > 0, mass / jnp.maximum(total, 1e-38), uniform)))
    return jnp.stack(rows)


def soft_optimal_token_logp(ref_logits: Array, token_rewards: Array, beta: float) -> Array:
    """Token conditionals of ``π* ∝ π_ref exp(Σ_t r_t/β)`` by the soft Bellman recursion.

    Args:
      ref_logits: ``[T, V^(T-1), V]`` reference token logits.
      token_rewards: ``[T, V^(T-1), V]`` r(y_<t, y_t) (a sequence-level reward is put on the
        last step, zeros elsewhere).
      beta: KL coefficient β.

    Returns:
      ``[T, V^(T-1), V]`` log π*(y_t | y_<t) (module docstring).
    """
    num_tokens, length = _shape(ref_logits)
    chex.assert_equal_shape([ref_logits, token_rewards])
    ref_logp = jax.nn.log_softmax(ref_logits, axis=-1)
    value_next = jnp.zeros((num_tokens ** (length - 1), num_tokens))
    rows = []
    for t in reversed(range(length)):
        scores = ref_logp[t] + (token_rewards[t] + value_next) / beta
        rows.append(jax.nn.log_softmax(scores, axis=-1))
        if t > 0:
            value = beta * jax.nn.logsumexp(scores, axis=-1)  # V(s) of the step-t prefixes
            # the step-t prefix with code c is (parent c // V, token c % V) of step t − 1
            children = value[: num_tokens**t].reshape(-1, num_tokens)
            value_next = jnp.zeros_like(value_next).at[: children.shape[0]].set(children)
    return jnp.stack(rows[::-1])
