"""RAFT: reward-ranked fine-tuning, i.e. supervised fine-tuning on best-of-n samples.

Dong et al. (2023), "RAFT: Reward rAnked FineTuning for Generative Foundation Model
Alignment", Algorithm 1: for each prompt draw n responses from the current model, keep the
one with the highest reward, and fine-tune on the kept responses with the SFT loss
(``ranking="local"``: the argmax of each row of ``rewards [P, n]``). ``ranking="global"``
keeps instead the top ``k`` of all ``P·n`` samples of the batch, for rewards that are
comparable across prompts. The online variant resamples from the model being trained every
stage; the offline variant samples once from the initial model. Both use the same
selection and loss on arrays; they differ only in which policy produced the samples,
which is the caller's loop.

Ties are broken toward the lowest sample index (``argmax`` order) in both rankings, so
the selection is a deterministic function of the rewards.

If every stage fits the selected samples exactly (the NLL minimiser over a full-support
table), one stage maps π to the best-of-n distribution of π, whose expected reward is at
least π's: iterated RAFT increases the expected reward monotonically.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction
from rlhf_jax.objectives.sft import Normalisation, sft_loss

Ranking = Literal["local", "global"]


def best_of_n_mask(rewards: Array, valid: Array | None = None) -> Array:
    """One-hot ``[P, n]`` mask of each prompt's highest-reward sample (local ranking).

    Args:
      rewards: ``[P, n]`` rewards of n samples per prompt.
      valid: optional ``[P, n]`` mask of samples that may be selected; a row with no
        valid sample selects nothing.

    Returns:
      ``[P, n]`` float mask with one 1 per row (the first maximiser).
    """
    chex.assert_rank(rewards, 2)
    if valid is not None:
        chex.assert_equal_shape([rewards, valid])
        rewards = jnp.where(valid > 0, rewards, -jnp.inf)
    mask = jax.nn.one_hot(jnp.argmax(rewards, axis=-1), rewards.shape[-1], dtype=jnp.float32)
    if valid is not None:
        mask = mask * jnp.any(valid > 0, axis=-1, keepdims=True)
    return mask


def top_k_mask(rewards: Array, k: int, valid: Array | None = None) -> Array:
    """``[P, n]`` mask of the ``k`` highest-reward samples of the whole batch (global ranking).

    Ties are broken toward the lowest flat index; invalid samples are never selected.
    """
    chex.assert_rank(rewards, 2)
    flat = rewards.reshape(-1)
    if valid is not None:
        chex.assert_equal_shape([rewards, valid])
        flat = jnp.where(valid.reshape(-1) > 0, flat, -jnp.inf)
    _, chosen = jax.lax.top_k(flat, k)
    mask = jnp.zeros_like(flat, dtype=jnp.float32).at[chosen].set(1.0)
    if valid is not None:
        mask = mask * (valid.reshape(-1) > 0)
    return mask.reshape(rewards.shape)


def raft_loss(
    token_logps: Array,
    token_mask: Array,
    rewards: Array,
    *,
    ranking: Ranking = "local",
    top_k: int | None = None,
    valid: Array | None = None,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """SFT loss (``sft.sft_loss``) on the reward-selected samples.

    Args:
      token_logps: ``[P, n, T]`` log π of the response tokens of every sample.
      token_mask: ``[P, n, T]`` 1 on response tokens.
      rewards: ``[P, n]`` rewards of the samples.
      ranking: ``"local"`` (best of n per prompt) or ``"global"`` (top ``top_k`` overall).
      top_k: number of samples kept by the global ranking (default P, one per prompt on
        average).
      valid: optional ``[P, n]`` mask of usable samples.
      normalisation: ``"token"`` or ``"sequence"``, as in ``sft_loss``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)``: ``sft_loss``'s metrics plus ``"selected_reward"`` (mean reward
      of the kept samples), ``"mean_reward"`` (of all valid samples) and ``"selected"``
      (the number of kept samples); every metric is a scalar. The selection mask itself is
      ``best_of_n_mask`` / ``top_k_mask`` of the same rewards.
    """
    chex.assert_rank(token_logps, 3)
    chex.assert_equal_shape([token_logps, token_mask])
    chex.assert_shape(rewards, token_logps.shape[:2])
    if ranking == "local":
        selected = best_of_n_mask(rewards, valid)
    elif ranking == "global":
        selected = top_k_mask(rewards, top_k or rewards.shape[0], valid)
    else:
        raise ValueError(f"ranking must be 'local' or 'global', got {ranking!r}")
    P, n, T = token_logps.shape
    mask = (token_mask * selected[..., None]).reshape(P * n, T)
    loss, metrics = sft_loss(
        token_logps.reshape(P * n, T), mask, normalisation=normalisation, reduction=reduction
    )
    usable = jnp.ones_like(rewards) if valid is None else valid.astype(rewards.dtype)
    metrics = dict(metrics)
    metrics["selected_reward"] = jnp.sum(jnp.where(selected > 0, rewards, 0.0)) / jnp.maximum(
        jnp.sum(selected), 1.0
    )
    metrics["mean_reward"] = jnp.sum(jnp.where(usable > 0, rewards, 0.0)) / jnp.maximum(
        jnp.sum(usable), 1.0
    )
    metrics["selected"] = jnp.sum(selected)
    return loss, metrics
