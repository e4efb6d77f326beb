"""Supervised fine-tuning: masked token negative log-likelihood.

Two normalisations: ``"token"`` averages the NLL over every unmasked token of the batch
(denominator = number of tokens), ``"sequence"`` averages each sequence's NLL over its own
tokens and then over sequences (denominator = number of sequences). Both survive gradient
accumulation when the micro-batches use ``reduction="sum"`` and the caller divides by the
whole batch's denominator.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

Normalisation = Literal["token", "sequence"]


def sft_loss(
    token_logps: Array,
    mask: Array,
    *,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Masked NLL ``−Σ_t m_t log π(y_t | x, y_<t)`` normalised by tokens or by sequences.

    ``"token"``: ``L = Σ_{b,t} m·(−log π) / Σ_{b,t} m``;
    ``"sequence"``: ``L = (1/B') Σ_b [Σ_t m·(−log π) / Σ_t m]`` over the B' sequences that
    have at least one target token.

    Args:
      token_logps: ``[B, T]`` log-probabilities of the target tokens.
      mask: ``[B, T]`` 1 on target tokens (e.g. the response), 0 on prompt and padding
        (non-negative token weights are allowed; padded log-probs may be non-finite).
      normalisation: ``"token"`` or ``"sequence"``.
      reduction: ``"mean"`` divides by the denominator, ``"sum"`` does not.

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"tokens"`` and ``"nll_per_token"``.
    """
    chex.assert_rank([token_logps, mask], 2)
    chex.assert_equal_shape([token_logps, mask])
    mask = mask.astype(token_logps.dtype)
    nll = jnp.where(mask > 0, -token_logps, 0.0)
    tokens = jnp.sum(mask)
    if normalisation == "token":
        loss, denominator = reduce_loss(nll, mask, reduction=reduction)
    elif normalisation == "sequence":
        lengths = jnp.sum(mask, axis=-1)
        has_tokens = (lengths > 0).astype(nll.dtype)
        per_sequence = jnp.sum(nll * mask, axis=-1) / jnp.maximum(lengths, 1.0)
        loss, denominator = reduce_loss(per_sequence, has_tokens, reduction=reduction)
    else:
        raise ValueError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")
    return loss, {
        "denominator": denominator,
        "tokens": tokens,
        "nll_per_token": jnp.sum(nll * mask) / jnp.maximum(tokens, 1.0),
    }
