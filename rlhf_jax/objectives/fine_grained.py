"""Fine-grained RLHF: dense rewards from several segment-level reward models.

Wu, Hu, Shi, Dziri, Suhr, Ammanabrolu, Smith, Ostendorf & Hajishirzi (2023),
"Fine-Grained Human Feedback Gives Better Rewards for Language Model Training", §2,
eq. 1. Each reward model ``k`` cuts the response into its own segments (sub-sentences
for relevance, sentences for factuality, the whole answer for completeness) and scores
each segment ``j``; the score is given at the segment's last token ``T_j^k``. The
per-token reward for PPO is

    r_t = Σ_k Σ_j 1(t = T_j^k) · w_k · R_k(x, y, j)  −  β log(π_θ(a_t|s_t) / π_init(a_t|s_t)),

with weights ``w_k`` trading the feedback types off. This module places and combines the
segment scores (:func:`segment_ends`, :func:`place_segment_rewards`,
:func:`combine_segment_rewards`); the KL term is added by the caller (e.g. on top of
``kl.kl_penalised_rewards`` with zero scores) and the advantages come from
``advantages.gae_advantages`` on the resulting dense rewards.

Training a segment-level reward model needs segment labels: a segment has an error type
iff one of its tokens does (:func:`segment_labels`), with token labels from the
annotated character spans (``data.builders.qa_feedback.error_token_labels``). Segments
come from character spans such as sentences (:func:`sentence_spans`,
:func:`token_segment_ids`).

A segment id is an int ``[B, T]`` array numbering each response token's segment (0, 1, …
in order); masked positions are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax import Array

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def segment_ends(mask: Array, segment_ids: Array) -> Array:
    """``[B, T]`` bool: the last response token of each segment.

    Token ``t`` ends its segment iff it is a response token and the next response token
    (skipping masked positions) has a different segment id, or there is none.

    Args:
      mask: ``[B, T]`` response mask.
      segment_ids: int ``[B, T]`` segment of each token.

    Returns:
      bool ``[B, T]``.
    """
    chex.assert_rank([mask, segment_ids], 2)
    chex.assert_equal_shape([mask, segment_ids])
    valid = mask > 0
    sentinel = jnp.iinfo(jnp.int32).min

    def next_valid_id(carry: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
        is_valid, segment = inputs
        return jnp.where(is_valid, segment, carry), carry

    start = jnp.full(mask.shape[0], sentinel, jnp.int32)
    _, following = jax.lax.scan(
        next_valid_id, start, (valid.T, segment_ids.astype(jnp.int32).T), reverse=True
    )
    return valid & (segment_ids != following.T)


def place_segment_rewards(segment_rewards: Array, segment_ids: Array, mask: Array) -> Array:
    """Put each segment's score on its last token: ``r_t = R(j) · 1(t = T_j)``.

    Args:
      segment_rewards: ``[B, S]`` score of segment ``j`` of each response.
      segment_ids: int ``[B, T]`` segment of each token, in ``[0, S)`` on response tokens.
      mask: ``[B, T]`` response mask.

    Returns:
      ``[B, T]`` rewards, non-zero only at segment ends.
    """
    chex.assert_rank([segment_rewards, segment_ids, mask], 2)
    chex.assert_equal_shape([segment_ids, mask])
    chex.assert_equal_shape_prefix([segment_rewards, mask], 1)
    index = jnp.clip(segment_ids, 0, segment_rewards.shape[1] - 1)
    per_token = jnp.take_along_axis(segment_rewards, index, axis=1)
    return jnp.where(segment_ends(mask, segment_ids), per_token, 0.0)


def combine_segment_rewards(
    segment_rewards: Sequence[Array],
    segment_ids: Sequence[Array],
    mask: Array,
    weights: Sequence[float] | Array,
) -> Array:
    """Dense rewards of several reward models, ``r_t = Σ_k w_k Σ_j 1(t = T_j^k) R_k(j)``.

    Wu et al. (2023), eq. 1 without the KL term. Each model has its own segmentation
    (and number of segments).

    Args:
      segment_rewards: per model ``k``, ``[B, S_k]`` segment scores.
      segment_ids: per model ``k``, int ``[B, T]`` segment ids.
      mask: ``[B, T]`` response mask.
      weights: ``[K]`` weights ``w_k``.

    Returns:
      ``[B, T]`` per-token rewards.
    """
    if not len(segment_rewards) == len(segment_ids) == len(weights):
        raise ValueError(
            f"need one segment_ids array and one weight per reward model: got "
            f"{len(segment_rewards)} rewards, {len(segment_ids)} segment ids, "
            f"{len(weights)} weights"
        )
    total = jnp.zeros(mask.shape, jnp.float32)
    for k, (rewards, ids) in enumerate(zip(segment_rewards, segment_ids, strict=True)):
        total = total + weights[k] * place_segment_rewards(rewards, ids, mask)
    return total


def segment_labels(token_labels: Array, segment_ids: Array, num_segments: int) -> Array:
    """Segment-level labels: segment ``j`` has label ``l`` iff one of its tokens has it.

    Args:
      token_labels: bool ``[T, L]`` per-token labels (e.g. error types from
        ``qa_feedback.error_token_labels``).
      segment_ids: int ``[T]`` segment of each token; ids outside ``[0, num_segments)``
        (e.g. padding) are dropped.
      num_segments: S.

    Returns:
      bool ``[S, L]``.
    """
    chex.assert_rank([token_labels, segment_ids], [2, 1])
    chex.assert_equal_shape_prefix([token_labels, segment_ids], 1)
    counts = jax.ops.segment_sum(
        jnp.asarray(token_labels, jnp.int32), jnp.asarray(segment_ids), num_segments=num_segments
    )
    return counts > 0


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences of ``text``, whitespace excluded.

    A sentence ends after a run of ``.``, ``!`` or ``?`` (with any closing quotes or
    brackets) that is followed by whitespace or the end of the text; trailing text
    without such an ending is a last sentence. (The paper's code uses a trained sentence
    splitter; this rule is a dependency-free stand-in.)

    Args:
      text: the response.

    Returns:
      The sentence spans, in order, covering every non-whitespace character.
    """
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    stripped = []
    for begin, end in spans:
        piece = text[begin:end]
        if piece.strip():
            left = begin + len(piece) - len(piece.lstrip())
            stripped.append((left, left + len(piece.strip())))
    return stripped


def token_segment_ids(offsets: Array, spans: Sequence[tuple[int, int]]) -> Array:
    """Segment id of each token from character spans: the first span that ends after it starts.

    A token with character range ``[s, e)`` gets ``j = #{spans with end ≤ s}`` (clipped to
    ``S − 1``): tokens inside span ``j`` get ``j``, and tokens between two spans (e.g. the
    whitespace before a sentence) join the following span, as subword tokenizers attach
    a leading space to the next word. So each segment's last token is the token holding
    its span's last character; text after the last span joins the last segment.

    Args:
      offsets: int ``[T, 2]`` character offsets per token.
      spans: ``S ≥ 1`` non-overlapping ``(start, end)`` spans in order.

    Returns:
      int32 ``[T]`` segment ids in ``[0, S)``.
    """
    offsets = jnp.asarray(offsets)
    chex.assert_shape(offsets, (None, 2))
    ends = jnp.asarray([end for _, end in spans], jnp.int32)
    count = jnp.sum(ends[None, :] <= offsets[:, :1], axis=1)
    return jnp.minimum(count, len(spans) - 1).astype(jnp.int32)
