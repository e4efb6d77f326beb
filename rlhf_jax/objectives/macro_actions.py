"""MA-RLHF: PPO over macro actions (runs of consecutive tokens) instead of single tokens.

Chai, Sun, Fang, Wang, Sun & Wu (2024), "MA-RLHF: Reinforcement Learning from Human
Feedback with Macro Actions", §3. A response ``a_1 … a_T`` is cut into macro actions
``ω_τ = (a_{t_τ}, …, a_{t_{τ+1}−1})`` by a termination rule; the paper's main rule is a
fixed length n (n-gram macros, :func:`fixed_length_macro_index`); rules that parse the
text (or any given boundaries) give :func:`boundary_macro_index`. Each macro is one
decision of a semi-Markov process:

- its probability is the product of its tokens' probabilities,
  ``log π(ω_τ | s_τ) = Σ_{t ∈ ω_τ} log π(a_t | s_t)`` (:func:`macro_sum`);
- its state is the state where it starts, so its value is ``V(s_{t_τ})``
  (:func:`macro_first`; :func:`macro_value` also offers the mean or the last of the
  macro's token values);
- its reward is the sum of its tokens' rewards (KL penalties and the final score),
  ``R_τ = Σ_{t ∈ ω_τ} r_t``;
- GAE runs over macros: ``δ_τ = R_τ + γ V(s_{t_{τ+1}}) − V(s_{t_τ})``,
  ``Â_τ = δ_τ + γλ Â_{τ+1}`` (:func:`macro_gae_advantages`);
- the PPO loss clips the macro ratio ``ρ_τ = π_θ(ω_τ|s_τ) / π_old(ω_τ|s_τ)``
  (:func:`macro_ppo_loss`), and the value loss regresses ``V(s_{t_τ})`` on the macro
  return ``Â_τ + V(s_{t_τ})``.

The authors' released code (github.com/ernie-research/MA-RLHF) differs in three places.
It clips per-token ratios, each token carrying its macro's advantage, and regresses every
token's value on its macro's return (offered as ``granularity="token"``). It estimates a
macro's value as a weighted mean ``Σ_i σ_i V(s_{t_τ+i})`` of its token values with equal,
last-position or position-decaying weights σ (the first two are
``value_weighting="mean"`` and ``"last"``). And it averages the token rewards of a macro
with the same weights instead of summing them, which is not offered: it rescales the KL
penalty by the macro length, whereas the sum is the return of the semi-Markov step.

Macro-level arrays are ``[B, T]`` with macro ``m`` of each row in slot ``m`` (there are at
most T macros) and a macro mask marking the slots in use, so shapes are static and the
token-level PPO functions (``advantages.gae_advantages``, ``ppo.ppo_loss``) are reused
unchanged. With macros of length 1 every function here equals its token-level
counterpart exactly.

A macro index is an int ``[B, T]`` array giving each response token the index of its
macro (0, 1, … in order) and ``T`` (no macro) on masked positions.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.ppo import Normalisation, ppo_loss
from rlhf_jax.objectives.reduction import Reduction

ValueWeighting = Literal["first", "mean", "last"]
Granularity = Literal["macro", "token"]


def fixed_length_macro_index(mask: Array, length: int) -> Array:
    """Macro index of fixed-length macros: the k-th response token is in macro ``⌊k / n⌋``.

    Tokens are counted over the mask (``k`` = number of response tokens before this one),
    so prompt or padding positions anywhere in the row are skipped. The last macro of a
    response may be shorter than ``n``.

    Args:
      mask: ``[B, T]`` response mask.
      length: n ≥ 1, tokens per macro.

    Returns:
      int32 ``[B, T]`` macro index (``T`` on masked positions).
    """
    chex.assert_rank(mask, 2)
    if length < 1:
        raise ValueError(f"macro length must be at least 1, got {length}")
    valid = mask > 0
    rank = jnp.cumsum(valid, axis=1) - 1
    return jnp.where(valid, rank // length, mask.shape[1]).astype(jnp.int32)


def boundary_macro_index(starts: Array, mask: Array) -> Array:
    """Macro index from given boundaries: a macro starts at each response token with ``starts``.

    The first response token always starts a macro. Use this for termination rules that
    parse the text (e.g. at punctuation or phrase boundaries).

    Args:
      starts: ``[B, T]`` 1 where a new macro begins.
      mask: ``[B, T]`` response mask.

    Returns:
      int32 ``[B, T]`` macro index (``T`` on masked positions).
    """
    chex.assert_rank([starts, mask], 2)
    chex.assert_equal_shape([starts, mask])
    valid = mask > 0
    first = valid & (jnp.cumsum(valid, axis=1) == 1)
    begins = valid & ((starts > 0) | first)
    index = jnp.cumsum(begins, axis=1) - 1
    return jnp.where(valid, index, mask.shape[1]).astype(jnp.int32)


def _segment(op, values: Array, macro_index: Array) -> Array:
    num_slots = values.shape[1]
    per_row = jax.vmap(lambda v, i: op(v, i, num_segments=num_slots + 1)[:num_slots])
    return per_row(values, macro_index)


def macro_mask(macro_index: Array) -> Array:
    """``[B, T]`` float mask of the macro slots in use (slot m is set iff macro m exists)."""
    chex.assert_rank(macro_index, 2)
    counts = _segment(jax.ops.segment_sum, jnp.ones(macro_index.shape), macro_index)
    return (counts > 0).astype(jnp.float32)


def macro_sum(values: Array, macro_index: Array) -> Array:
    """Per-macro sums ``Σ_{t ∈ ω_m} x_t`` in slot m (0 on unused slots).

    With token log-probs this is the macro log-probability ``log π(ω_m | s_m)``; with
    token rewards the macro reward ``R_m``.

    Args:
      values: ``[B, T]`` token-level values.
      macro_index: int ``[B, T]`` macro index.

    Returns:
      ``[B, T]`` macro-level sums.
    """
    chex.assert_rank([values, macro_index], 2)
    chex.assert_equal_shape([values, macro_index])
    return _segment(jax.ops.segment_sum, values, macro_index)


def macro_first(values: Array, macro_index: Array) -> Array:
    """Each macro's value at its first token, ``x_{t_m}``, in slot m (0 on unused slots).

    With token values ``V(s_t)`` this is the macro state's value ``V(s_{t_m})``.

    Args:
      values: ``[B, T]`` token-level values.
      macro_index: int ``[B, T]`` macro index.

    Returns:
      ``[B, T]`` macro-level values.
    """
    chex.assert_rank([values, macro_index], 2)
    chex.assert_equal_shape([values, macro_index])
    num_slots = values.shape[1]
    positions = jnp.broadcast_to(jnp.arange(num_slots), values.shape)
    first = _segment(jax.ops.segment_min, positions, macro_index)
    present = first < num_slots
    gathered = jnp.take_along_axis(values, jnp.where(present, first, 0), axis=1)
    return jnp.where(present, gathered, 0.0)


def macro_value(values: Array, macro_index: Array, *, weighting: ValueWeighting = "first") -> Array:
    """Each macro's value from its token values, in slot m (0 on unused slots).

    ``"first"``: ``V(s_{t_m})``, the value of the state where the macro starts (the
    semi-Markov value); ``"mean"``: the mean of the macro's token values (the released
    code's equal weighting σ_i = 1/|ω|); ``"last"``: the value at its last token (its
    "unit" weighting).

    Args:
      values: ``[B, T]`` token values.
      macro_index: int ``[B, T]`` macro index.
      weighting: ``"first"``, ``"mean"`` or ``"last"``.

    Returns:
      ``[B, T]`` macro-level values.
    """
    if weighting == "first":
        return macro_first(values, macro_index)
    if weighting == "mean":
        counts = macro_sum(jnp.ones_like(values), macro_index)
        return macro_sum(values, macro_index) / jnp.maximum(counts, 1.0)
    if weighting == "last":
        # The first token of each macro in the reversed rows is its last token.
        return macro_first(values[:, ::-1], macro_index[:, ::-1])
    raise ValueError(f"weighting must be 'first', 'mean' or 'last', got {weighting!r}")


def macro_to_tokens(macro_values: Array, macro_index: Array) -> Array:
    """Broadcast macro-level values back to the tokens of each macro (0 on masked tokens).

    Args:
      macro_values: ``[B, T]`` values in macro slots (e.g. macro advantages).
      macro_index: int ``[B, T]`` macro index.

    Returns:
      ``[B, T]`` token-level values.
    """
    chex.assert_rank([macro_values, macro_index], 2)
    chex.assert_equal_shape([macro_values, macro_index])
    num_slots = macro_index.shape[1]
    present = macro_index < num_slots
    gathered = jnp.take_along_axis(macro_values, jnp.where(present, macro_index, 0), axis=1)
    return jnp.where(present, gathered, 0.0)


def macro_gae_advantages(
    rewards: Array,
    values: Array,
    macro_index: Array,
    *,
    gamma: float,
    lam: float,
    value_weighting: ValueWeighting = "first",
) -> tuple[Array, Array]:
    """GAE over macro actions (Chai et al., 2024, §3).

    ``R_τ = Σ_{t∈ω_τ} r_t``, ``V_τ`` the macro value (:func:`macro_value`),
    ``δ_τ = R_τ + γ V_{τ+1} − V_τ`` and ``Â_τ = δ_τ + γλ Â_{τ+1}``, with ``V = 0`` after
    the last macro; computed by ``advantages.gae_advantages`` on the macro slots.

    Args:
      rewards: ``[B, T]`` token rewards (e.g. ``kl.kl_penalised_rewards``).
      values: ``[B, T]`` token values ``V(s_t)`` at sampling time.
      macro_index: int ``[B, T]`` macro index.
      gamma: discount γ per macro step.
      lam: GAE λ.
      value_weighting: how token values make a macro value (:func:`macro_value`).

    Returns:
      ``(advantages, returns)``, ``[B, T]`` in macro slots (0 on unused slots).
    """
    chex.assert_equal_shape([rewards, values, macro_index])
    return gae_advantages(
        macro_sum(rewards, macro_index),
        macro_value(values, macro_index, weighting=value_weighting),
        macro_mask(macro_index),
        gamma=gamma,
        lam=lam,
    )


def macro_ppo_loss(
    logp: Array,
    old_logp: Array,
    macro_advantages: Array,
    values: Array,
    old_values: Array,
    macro_returns: Array,
    macro_index: Array,
    *,
    clip_eps: float = 0.2,
    value_clip_eps: float | None = 0.2,
    value_coef: float = 0.5,
    value_weighting: ValueWeighting = "first",
    granularity: Granularity = "macro",
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """MA-PPO: the PPO loss with one clipped ratio per macro action (Chai et al., 2024, §3).

    ``granularity="macro"``: ``ppo.ppo_loss`` on the macro slots,
    ``L = −mean_τ min(ρ_τ Â_τ, clip(ρ_τ, 1−ε, 1+ε) Â_τ) + c₁ · ½ mean_τ max((V_τ − R̂_τ)², …)``
    with ``ρ_τ = exp(Σ_{t∈ω_τ} (log π_θ − log π_old))`` and ``V_τ`` the macro value; the
    ``"token"`` normalisation averages over macros (each macro is one step),
    ``"sequence"`` over each sequence's macros and then over sequences.
    ``granularity="token"`` (the authors' released code): ``ppo.ppo_loss`` on the tokens,
    each token's ratio clipped on its own with its macro's advantage, and each token's
    value regressed on its macro's return; averages are over tokens.

    Args:
      logp: ``[B, T]`` token log π_θ (differentiated).
      old_logp: ``[B, T]`` token log π_old.
      macro_advantages: ``[B, T]`` macro advantages from :func:`macro_gae_advantages`.
      values: ``[B, T]`` current token values (differentiated).
      old_values: ``[B, T]`` token values at sampling time.
      macro_returns: ``[B, T]`` macro value targets from :func:`macro_gae_advantages`.
      macro_index: int ``[B, T]`` macro index.
      clip_eps: policy ratio clip ε.
      value_clip_eps: value clip ε (None: unclipped).
      value_coef: c₁.
      value_weighting: macro value (:func:`macro_value`), as in the advantages; only used
        with ``granularity="macro"``.
      granularity: ``"macro"`` (one ratio per macro) or ``"token"``.
      normalisation: ``"token"`` (per step) or ``"sequence"``.
      reduction: ``"mean"`` or ``"sum"``; ``denominator`` counts steps (macros, or tokens
        for ``granularity="token"``) or sequences.

    Returns:
      ``(loss, metrics)`` as ``ppo.ppo_loss``, plus ``"macros"`` (the number of macros).
    """
    chex.assert_equal_shape(
        [logp, old_logp, macro_advantages, values, old_values, macro_returns, macro_index]
    )
    slots = macro_mask(macro_index)
    hyper = {
        "clip_eps": clip_eps,
        "value_clip_eps": value_clip_eps,
        "value_coef": value_coef,
        "normalisation": normalisation,
        "reduction": reduction,
    }
    if granularity == "macro":
        loss, metrics = ppo_loss(
            macro_sum(logp, macro_index),
            macro_sum(old_logp, macro_index),
            macro_advantages,
            macro_value(values, macro_index, weighting=value_weighting),
            macro_value(old_values, macro_index, weighting=value_weighting),
            macro_returns,
            slots,
            **hyper,
        )
    elif granularity == "token":
        token_mask = (macro_index < macro_index.shape[1]).astype(logp.dtype)
        loss, metrics = ppo_loss(
            logp,
            old_logp,
            macro_to_tokens(macro_advantages, macro_index),
            values,
            old_values,
            macro_to_tokens(macro_returns, macro_index),
            token_mask,
            **hyper,
        )
    else:
        raise ValueError(f"granularity must be 'macro' or 'token', got {granularity!r}")
    return loss, {**metrics, "macros": jnp.sum(slots)}
