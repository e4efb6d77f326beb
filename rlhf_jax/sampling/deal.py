r"""DeAL: decoding as a reward-guided lookahead search (Huang et al., 2024).

Huang, Sengupta, Bonadiman, Lai, Gupta, Pappas, Mansour, Kirchhoff and Roth (2024),
"DeAL: Decoding-time Alignment for Large Language Models", frame generation as a
heuristic search over partial replies: a state is the prompt and the reply so far, an
action appends a token, and the search is guided by an alignment reward ``R`` that
scores the partial reply *after a short lookahead*. This module implements the search as
a beam search with static shapes, jitted once per configuration:

1. **Action selection.** Every live beam ``y_<n`` proposes its ``k`` most likely next
   tokens under the policy (``num_candidates``), so ``b·k`` candidates per prompt.
2. **Lookahead.** Each candidate ``c`` is rolled out greedily for ``L`` more tokens
   (``lookahead``) with the KV cache: ``ŷ = (y_<n, c, ĝ_1 … ĝ_L)``, stopping at EOS.
3. **Heuristic.** Candidates are ranked by

       f(y_<n, c) = log π(y_<n, c | x) + λ · R(x, ŷ)

   (the path cost ``g`` of A*, here the policy's log-likelihood, plus the reward of the
   lookahead completion as the heuristic ``h``, weighted by ``λ = reward_weight``), and
   the best ``b`` (``beam_width``) become the beams of step ``n + 1``.
4. When every beam has emitted EOS or ``max_new_tokens`` are generated, the beam with the
   largest ``log π(y | x) + λ · R(x, y)`` (without lookahead) is returned.

With ``λ = 0`` the ranking is the log-likelihood alone: ``beam_width = 1`` is greedy
decoding and ``beam_width = b ≤ num_candidates`` is standard beam search of width ``b``
(the best ``b`` of all ``b·V`` extensions lie among the per-beam top ``b``). The reward
is any traceable :class:`RewardFn`: a scalar reward or cost model
(:class:`ModelReward`, scoring at the last real token with
:func:`rlhf_jax.models.heads.sequence_score`), programmatic constraints
(:class:`KeywordReward`, :class:`LengthPenalty`), or a weighted sum of these
(:class:`WeightedReward`). Log-likelihoods are not length-normalised.

The paper states the search generally (A* with a beam of open states and lookahead
rollouts); the beam form and the exact ``f`` above are this implementation's choices,
with the path cost ``g`` the unnormalised log-likelihood.

Cost: each generated token runs ``L + 1`` single-token policy steps on ``B·b·k`` rows and
one reward evaluation of those rows' full sequences. The cache holds ``P + N + L`` slots;
lookahead keys written past a candidate's slot are stale but invisible (causal mask) and
are overwritten when real tokens reach those slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import Array

from rlhf_jax.models.transformer import KVCache


class RewardFn(Protocol):
    """A traceable, hashable reward of (partial) replies.

    ``reward(params, tokens, attention_mask, response_mask) -> [M]``: ``tokens`` ``[M, T]``
    are left-padded prompts followed by the reply, ``attention_mask`` marks real tokens and
    ``response_mask`` the reply tokens (EOS included); ``params`` is the reward's own
    pytree (e.g. a reward model's parameters, ``None`` for programmatic rewards).
    """

    def __call__(
        self, params: Any, tokens: Array, attention_mask: Array, response_mask: Array
    ) -> Array:
        """Rewards ``[M]``."""
        ...


@dataclasses.dataclass(frozen=True)
class ModelReward:
    """A scalar model's sequence score ``r(x, y) = v_θ(x, y)[last real token]``.

    Attributes:
      graphdef: graph definition of a :class:`rlhf_jax.models.ScalarModel` (reward or
        cost model); its parameters are the reward's ``params``.
    """

    graphdef: nnx.GraphDef

    def __call__(
        self, params: Any, tokens: Array, attention_mask: Array, response_mask: Array
    ) -> Array:
        """Scores ``[M]`` at each row's last real token."""
        del response_mask
        return nnx.merge(self.graphdef, params).score(tokens, attention_mask)


@dataclasses.dataclass(frozen=True)
class KeywordReward:
    """``1`` when the token sequence ``keyword`` occurs contiguously in the reply, else ``0``.

    Attributes:
      keyword: the keyword's token ids (at least one).
    """

    keyword: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.keyword:
            raise ValueError("KeywordReward.keyword must hold at least one token id")

    def __call__(
        self, params: Any, tokens: Array, attention_mask: Array, response_mask: Array
    ) -> Array:
        """``[M]`` floats in ``{0, 1}``."""
        del params, attention_mask
        chex.assert_equal_shape([tokens, response_mask])
        width = tokens.shape[1] - len(self.keyword) + 1
        if width < 1:
            return jnp.zeros(tokens.shape[:1], jnp.float32)
        match = jnp.ones((tokens.shape[0], width), bool)
        for offset, token in enumerate(self.keyword):
            window = slice(offset, offset + width)
            match &= (tokens[:, window] == token) & (response_mask[:, window] > 0)
        return jnp.any(match, axis=1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
    """``−max(0, |y| − max_tokens)``: zero for replies of at most ``max_tokens`` tokens.

    Attributes:
      max_tokens: the length budget in reply tokens (EOS included).
    """

    max_tokens: int

    def __call__(
        self, params: Any, tokens: Array, attention_mask: Array, response_mask: Array
    ) -> Array:
        """``[M]`` non-positive floats."""
        del params, tokens, attention_mask
        length = jnp.sum(response_mask > 0, axis=1).astype(jnp.float32)
        return -jnp.maximum(length - self.max_tokens, 0.0)


@dataclasses.dataclass(frozen=True)
class WeightedReward:
    """``R = Σ_i w_i R_i``; its ``params`` is a tuple aligned with ``terms``.

    Attributes:
      terms: ``(weight, reward)`` pairs, e.g. ``((1.0, ModelReward(rm)), (-1.0,
        ModelReward(cm)))`` for reward minus cost.
    """

    terms: tuple[tuple[float, RewardFn], ...]

    def __call__(
        self, params: Any, tokens: Array, attention_mask: Array, response_mask: Array
    ) -> Array:
        """The weighted sum ``[M]``."""
        if len(params) != len(self.terms):
            raise ValueError(
                f"WeightedReward has {len(self.terms)} terms but {len(params)} params entries"
            )
        total = jnp.zeros(tokens.shape[:1], jnp.float32)
        for (weight, reward), term_params in zip(self.terms, params, strict=True):
            total = total + weight * reward(term_params, tokens, attention_mask, response_mask)
        return total


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeALConfig:
    """Static settings of the search (hashable: one compilation per config).

    Attributes:
      max_new_tokens: ``N``, reply tokens generated at most.
      eos_id: token that ends a reply; ``None`` lets every beam run to ``N``.
      pad_id: token written after EOS.
      beam_width: ``b``, beams kept per prompt.
      num_candidates: ``k ≥ b``, next tokens each beam proposes (top-k of the policy).
      lookahead: ``L ≥ 0``, greedy tokens rolled out after each candidate before scoring.
      reward_weight: ``λ`` of ``f = log π + λ · R``.
    """

    max_new_tokens: int
    eos_id: int | None
    pad_id: int = 0
    beam_width: int = 1
    num_candidates: int = 4
    lookahead: int = 4
    reward_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.num_candidates < self.beam_width:
            raise ValueError(
                f"num_candidates ({self.num_candidates}) must be >= beam_width "
                f"({self.beam_width}) so that the first step fills every beam"
            )
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")


@struct.dataclass
class DeALOutput:
    """The best beam per prompt, ``[B, P + N]`` arrays laid out like the sampler's output.

    Attributes:
      tokens: int32, the left-padded prompt, the reply, then ``pad_id``.
      attention_mask: int32, 1 on real prompt tokens and reply tokens.
      response_mask: int32, 1 on reply tokens up to and including EOS.
      logprob: ``[B]`` float32, ``log π(y | x)`` of the reply.
      reward: ``[B]`` float32, ``R(x, y)`` of the reply (no lookahead).
    """

    tokens: Array
    attention_mask: Array
    response_mask: Array
    logprob: Array
    reward: Array


@struct.dataclass
class _Beams:
    step: Array  # tokens generated so far, n
    cache: KVCache  # beams flattened into the batch axis: B·b rows per layer
    next_log_probs: Array  # [B, b, V], log π(· | x, y_<n)
    tokens: Array  # [B, b, P + N + L]
    response_mask: Array  # [B, b, P + N + L]
    logprob: Array  # [B, b], log π(y_<n | x); -inf for an empty beam
    done: Array  # [B, b]


def _is_eos(tokens: Array, eos_id: int | None) -> Array:
    if eos_id is None:
        return jnp.zeros(tokens.shape, bool)
    return tokens == eos_id


def _gather_rows(tree: Any, rows: Array) -> Any:
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def _write(buffer: Array, columns: Array, start: Array) -> Array:
    """Write ``columns [M, W]`` into ``buffer [M, T]`` at column ``start``."""
    return jax.lax.dynamic_update_slice(buffer, columns.astype(buffer.dtype), (0, start))


def _greedy_rollout(
    model: nnx.Module,
    cache: KVCache,
    log_probs: Array,
    cache_mask: Array,
    positions: Array,
    slot: Array,
    done: Array,
    config: DeALConfig,
) -> tuple[Array, Array]:
    """``lookahead`` greedy tokens after the candidate at ``slot``; ``(tokens, mask) [M, L]``.

    Rows already ``done`` (their candidate was EOS or padding) emit padding with mask 0.
    """

    def step(carry, offset):
        cache, log_probs, done = carry
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        emitted = jnp.logical_not(done)
        token = jnp.where(emitted, token, config.pad_id)
        logits, cache = model(
            token[:, None],
            positions=(positions + offset + 1)[:, None],
            attention_mask=cache_mask,
            cache=cache,
            cache_index=slot + offset + 1,
        )
        done = jnp.logical_or(done, _is_eos(token, config.eos_id))
        next_log_probs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
        return (cache, next_log_probs, done), (token, emitted.astype(jnp.int32))

    _, (tokens, mask) = jax.lax.scan(
        step, (cache, log_probs, done), jnp.arange(config.lookahead, dtype=jnp.int32)
    )
    return tokens.T, mask.T


def _deal(
    graphdef: nnx.GraphDef,
    params: Any,
    reward_fn: RewardFn,
    reward_params: Any,
    prompt_tokens: Array,
    prompt_mask: Array,
    config: DeALConfig,
) -> DeALOutput:
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    batch, prompt_len = prompt_tokens.shape
    beams, cands, lookahead = config.beam_width, config.num_candidates, config.lookahead
    new, width = config.max_new_tokens, prompt_tokens.shape[1] + config.max_new_tokens
    slots = width + lookahead
    rows, cand_rows = batch * beams, batch * beams * cands
    model = nnx.merge(graphdef, params)

    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, new + lookahead), jnp.int32)], 1)
    logits, cache = model(
        prompt_tokens,
        positions=jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0),
        attention_mask=cache_mask,
        cache=model.init_cache(batch, slots),
        cache_index=jnp.asarray(0, jnp.int32),
    )
    first_log_probs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)

    def per_beam(x: Array) -> Array:  # [B, ...] -> [B, b, ...]
        return jnp.repeat(x[:, None], beams, axis=1)

    def flat(x: Array) -> Array:  # [B, b, ...] -> [B·b, ...]
        return x.reshape(rows, *x.shape[2:])

    beam_cache_mask = flat(per_beam(cache_mask))
    beam_lengths = flat(per_beam(prompt_lengths))
    cand_cache_mask = jnp.repeat(beam_cache_mask, cands, axis=0)
    cand_lengths = jnp.repeat(beam_lengths, cands, axis=0)
    padding = jnp.full((batch, new + lookahead), config.pad_id, jnp.int32)
    # Only beam 0 is live at first, so the first step does not fill the beam with copies.
    empty = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)
    state = _Beams(
        step=jnp.asarray(0, jnp.int32),
        cache=jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cache),
        next_log_probs=per_beam(first_log_probs),
        tokens=per_beam(jnp.concatenate([prompt_tokens, padding], axis=1)),
        response_mask=jnp.zeros((batch, beams, slots), jnp.int32),
        logprob=jnp.broadcast_to(empty, (batch, beams)).astype(jnp.float32),
        done=jnp.zeros((batch, beams), bool),
    )
    pad_only = jnp.where(jnp.arange(first_log_probs.shape[-1]) == config.pad_id, 0.0, -jnp.inf)

    def keep_going(state: _Beams) -> Array:
        return jnp.logical_and(state.step < new, jnp.logical_not(state.done.all()))

    def search_step(state: _Beams) -> _Beams:
        n = state.step
        slot = prompt_len + n
        # 1. Action selection: top-k next tokens per beam; a finished beam only pads.
        log_probs = jnp.where(state.done[..., None], pad_only, state.next_log_probs)
        cand_log_probs, cand_tokens = jax.lax.top_k(log_probs, cands)  # [B, b, k]
        cand_logprob = state.logprob[..., None] + cand_log_probs
        cand_emitted = jnp.broadcast_to(jnp.logical_not(state.done)[..., None], cand_tokens.shape)
        flat_tokens = cand_tokens.reshape(cand_rows)
        flat_emitted = cand_emitted.reshape(cand_rows)
        # 2. Feed each candidate (its cache is the one kept if it survives), then look ahead.
        cand_cache = jax.tree.map(lambda x: jnp.repeat(x, cands, axis=0), state.cache)
        positions = cand_lengths + n
        logits, cand_cache = model(
            flat_tokens[:, None],
            positions=positions[:, None],
            attention_mask=cand_cache_mask,
            cache=cand_cache,
            cache_index=slot,
        )
        after_log_probs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
        cand_done = jnp.logical_not(flat_emitted) | _is_eos(flat_tokens, config.eos_id)
        base_tokens = jnp.repeat(flat(state.tokens), cands, axis=0)
        base_mask = jnp.repeat(flat(state.response_mask), cands, axis=0)
        with_cand = _write(base_tokens, flat_tokens[:, None], slot)
        with_cand_mask = _write(base_mask, flat_emitted[:, None], slot)
        scored_tokens, scored_mask = with_cand, with_cand_mask
        if lookahead:
            ahead, ahead_mask = _greedy_rollout(
                model,
                cand_cache,
                after_log_probs,
                cand_cache_mask,
                positions,
                slot,
                cand_done,
                config,
            )
            scored_tokens = _write(with_cand, ahead, slot + 1)
            scored_mask = _write(with_cand_mask, ahead_mask, slot + 1)
        # 3. Heuristic f = log π(y_<n, c) + λ R(lookahead completion); keep the best b.
        heuristic = cand_logprob.reshape(batch, beams * cands)
        if config.reward_weight != 0.0:
            prompt_part = jnp.repeat(beam_cache_mask[:, :prompt_len], cands, axis=0)
            attention = jnp.concatenate([prompt_part, scored_mask[:, prompt_len:]], axis=1)
            rewards = reward_fn(reward_params, scored_tokens, attention, scored_mask)
            chex.assert_shape(rewards, (cand_rows,))
            heuristic = heuristic + config.reward_weight * rewards.reshape(batch, -1)
        _, chosen = jax.lax.top_k(heuristic, beams)  # [B, b] indices into b·k
        picked = (jnp.arange(batch)[:, None] * beams * cands + chosen).reshape(rows)

        def pick(x: Array) -> Array:
            return jnp.take(x, picked, axis=0)

        return _Beams(
            step=n + 1,
            cache=_gather_rows(cand_cache, picked),
            next_log_probs=pick(after_log_probs).reshape(batch, beams, -1),
            tokens=pick(with_cand).reshape(batch, beams, slots),
            response_mask=pick(with_cand_mask).reshape(batch, beams, slots),
            logprob=pick(cand_logprob.reshape(cand_rows)).reshape(batch, beams),
            done=pick(cand_done).reshape(batch, beams),
        )

    state = jax.lax.while_loop(keep_going, search_step, state)
    # 4. The best beam by log π(y) + λ R(y), the reward now of the reply itself.
    tokens = flat(state.tokens)[:, :width]
    response_mask = flat(state.response_mask)[:, :width]
    attention = jnp.concatenate([beam_cache_mask[:, :prompt_len], response_mask[:, prompt_len:]], 1)
    rewards = reward_fn(reward_params, tokens, attention, response_mask).reshape(batch, beams)
    final = (
        state.logprob + config.reward_weight * rewards if config.reward_weight else state.logprob
    )
    best = jnp.arange(batch) * beams + jnp.argmax(final, axis=1)
    return DeALOutput(
        tokens=tokens[best],
        attention_mask=attention[best],
        response_mask=response_mask[best],
        logprob=state.logprob.reshape(rows)[best],
        reward=rewards.reshape(rows)[best],
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "reward_fn", "config"))
def deal_decode(
    graphdef: nnx.GraphDef,
    params: Any,
    reward_fn: RewardFn,
    reward_params: Any,
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    config: DeALConfig,
) -> DeALOutput:
    """Decode replies by the reward-guided lookahead beam search of the module docstring.

    Args:
      graphdef: the policy decoder's graph definition (static).
      params: the policy's parameters.
      reward_fn: a hashable :class:`RewardFn` (static), e.g. :class:`ModelReward`.
      reward_params: the reward's parameters (``None`` for programmatic rewards).
      prompt_tokens: ``[B, P]`` left-padded prompts.
      prompt_mask: ``[B, P]``, 1 on real prompt tokens; every row has at least one.
      config: static search settings.

    Returns:
      A :class:`DeALOutput` with the best beam of every prompt.
    """
    return _deal(graphdef, params, reward_fn, reward_params, prompt_tokens, prompt_mask, config)
