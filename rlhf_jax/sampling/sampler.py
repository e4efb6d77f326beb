"""Jitted autoregressive sampling with a KV cache and static shapes.

Prompts arrive left-padded, ``prompt_tokens [B, P]`` with ``prompt_mask [B, P]``; every row
needs at least one real prompt token. One prefill pass writes the prompt's keys and values
into a cache of ``S = P + N`` slots (``N = max_new_tokens``) and gives the distribution of
the first new token; then a ``lax.while_loop`` feeds the last token at slot ``P + n - 1``
(position ``prompt_length + n - 1``) and draws token ``n`` into slot ``P + n``. A row that
has emitted ``eos_id`` is done: its later slots hold ``pad_id`` with masks and log-probs 0.
The loop stops as soon as every row is done, or after ``N`` tokens.

The output lays prompt and response side by side in ``[B, P + N]`` arrays, in the layout
the trainer's log-prob function consumes: ``logprobs[b, t] = log q(tokens[b, t] |
tokens[b, <t])`` where ``response_mask[b, t] = 1``, and 0 elsewhere. Positions are
``max(cumsum(attention_mask) - 1, 0)``, the default of an uncached forward pass, so at
temperature 1 without top-k / top-p the reported log-probs are those of a full forward
pass over ``tokens`` with ``attention_mask``.

Several models can be sampled from jointly (``sample_combined``): at every step each model
advances its own cache and the token is drawn from ``log_softmax(Σ_i w_i ·
log_softmax(logits_i))`` (see ``processing.combine_logits``), e.g. Nash-MD's geometric
mixture ``π^{1-β} · π_ref^β`` with weights ``(1 - β, β)`` (Munos et al., 2024).

The cache is allocated inside the jitted function and updated in place by XLA within the
loop, so there is no input buffer worth donating. Both entry points compile once per
(graphdefs, config, input shapes); new prompts, parameters, weights or keys of the same
shapes reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import Array

from rlhf_jax.sampling.processing import combine_logits, sampling_log_probs


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Static settings of one sampler (hashable: one compilation per distinct config).

    Attributes:
      max_new_tokens: ``N``, the number of tokens generated at most per row.
      eos_id: token that ends a row (kept, with ``response_mask`` 1); ``None`` lets every
        row run to ``max_new_tokens``.
      pad_id: token written after a row's EOS and in unused slots.
      temperature: ``T > 0``; scores are divided by it before the softmax.
      top_k: keep the ``k`` most likely tokens; 0 disables the filter.
      top_p: nucleus mass in ``(0, 1]``; 1 disables the filter.
      greedy: take the most likely token instead of drawing one. The reported log-prob is
        still that of the (tempered, filtered) distribution ``q``.
    """

    max_new_tokens: int
    eos_id: int | None
    pad_id: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")


@struct.dataclass
class SampleOutput:
    """Prompts and sampled responses, all ``[B, P + N]`` with prompt then generation.

    Attributes:
      tokens: int32 token ids: the left-padded prompt, the response, then ``pad_id``.
      attention_mask: int32, 1 on real prompt tokens and on response tokens.
      response_mask: int32, 1 on generated tokens up to and including EOS.
      logprobs: float32 ``log q(tokens[t] | tokens[<t])`` under the distribution the token
        was drawn from, 0 where ``response_mask`` is 0.
    """

    tokens: Array
    attention_mask: Array
    response_mask: Array
    logprobs: Array


@struct.dataclass
class _LoopState:
    num_generated: Array
    caches: tuple[Any, ...]
    tokens: Array
    response_mask: Array
    logprobs: Array
    done: Array


def _is_eos(tokens: Array, config: SamplingConfig) -> Array:
    if config.eos_id is None:
        return jnp.zeros(tokens.shape, bool)
    return tokens == config.eos_id


def _choose_tokens(
    scores: Array, key: Array, done: Array, config: SamplingConfig
) -> tuple[Array, Array, Array]:
    """Draw one token per row; rows already done get ``pad_id``, mask 0 and log-prob 0."""
    log_q = sampling_log_probs(
        scores, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
    )
    if config.greedy:
        tokens = jnp.argmax(log_q, axis=-1)
    else:
        tokens = jax.random.categorical(key, log_q, axis=-1)
    tokens = tokens.astype(jnp.int32)
    token_log_q = jnp.take_along_axis(log_q, tokens[:, None], axis=-1)[:, 0]
    emitted = jnp.logical_not(done)
    return (
        jnp.where(emitted, tokens, config.pad_id),
        jnp.where(emitted, token_log_q, 0.0),
        emitted.astype(jnp.int32),
    )


def _forward_all(
    models: Sequence[nnx.Module],
    caches: tuple[Any, ...],
    weights: Array,
    tokens: Array,
    positions: Array,
    cache_mask: Array,
    cache_index: Array,
) -> tuple[Array, tuple[Any, ...]]:
    """Run every model on ``tokens`` with its cache; combined scores of the last position."""
    last_logits, new_caches = [], []
    for model, cache in zip(models, caches, strict=True):
        logits, cache = model(
            tokens,
            positions=positions,
            attention_mask=cache_mask,
            cache=cache,
            cache_index=cache_index,
        )
        last_logits.append(logits[:, -1])
        new_caches.append(cache)
    return combine_logits(last_logits, weights), tuple(new_caches)


def _generate(
    graphdefs: tuple[nnx.GraphDef, ...],
    params: tuple[Any, ...],
    weights: Array,
    prompt_tokens: Array,
    prompt_mask: Array,
    rng: Array,
    config: SamplingConfig,
) -> SampleOutput:
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    batch, prompt_len = prompt_tokens.shape
    max_new = config.max_new_tokens
    total_len = prompt_len + max_new
    models = [nnx.merge(g, p) for g, p in zip(graphdefs, params, strict=True)]
    caches = tuple(m.init_cache(batch, total_len) for m in models)

    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)
    # Slots after the prompt are visible once written; causality hides the later ones.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new), jnp.int32)], axis=1)

    scores, caches = _forward_all(
        models,
        caches,
        weights,
        prompt_tokens,
        jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0),
        cache_mask,
        jnp.asarray(0, jnp.int32),
    )
    not_done = jnp.zeros((batch,), bool)
    first, first_log_q, first_mask = _choose_tokens(
        scores, jax.random.fold_in(rng, 0), not_done, config
    )

    def write(buffer: Array, column: Array, n: Array) -> Array:
        return jax.lax.dynamic_update_slice(buffer, column[:, None], (0, prompt_len + n))

    zero = jnp.asarray(0, jnp.int32)
    state = _LoopState(
        num_generated=jnp.asarray(1, jnp.int32),
        caches=caches,
        tokens=write(
            jnp.concatenate(
                [prompt_tokens, jnp.full((batch, max_new), config.pad_id, jnp.int32)], axis=1
            ),
            first,
            zero,
        ),
        response_mask=write(jnp.zeros((batch, total_len), jnp.int32), first_mask, zero),
        logprobs=write(jnp.zeros((batch, total_len), jnp.float32), first_log_q, zero),
        done=_is_eos(first, config),
    )

    def keep_going(state: _LoopState) -> Array:
        return jnp.logical_and(state.num_generated < max_new, jnp.logical_not(state.done.all()))

    def step(state: _LoopState) -> _LoopState:
        n = state.num_generated
        previous_slot = prompt_len + n - 1
        previous = jax.lax.dynamic_slice_in_dim(state.tokens, previous_slot, 1, axis=1)
        scores, caches = _forward_all(
            models,
            state.caches,
            weights,
            previous,
            (prompt_lengths + n - 1)[:, None],
            cache_mask,
            previous_slot,
        )
        token, token_log_q, emitted = _choose_tokens(
            scores, jax.random.fold_in(rng, n), state.done, config
        )
        return _LoopState(
            num_generated=n + 1,
            caches=caches,
            tokens=write(state.tokens, token, n),
            response_mask=write(state.response_mask, emitted, n),
            logprobs=write(state.logprobs, token_log_q, n),
            done=jnp.logical_or(state.done, _is_eos(token, config)),
        )

    state = jax.lax.while_loop(keep_going, step, state)
    return SampleOutput(
        tokens=state.tokens,
        attention_mask=jnp.concatenate([prompt_mask, state.response_mask[:, prompt_len:]], axis=1),
        response_mask=state.response_mask,
        logprobs=state.logprobs,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def sample(
    graphdef: nnx.GraphDef,
    params: Any,
    prompt_tokens: Array,
    prompt_mask: Array,
    rng: Array,
    *,
    config: SamplingConfig,
) -> SampleOutput:
    """Sample responses from one model.

    Draws ``y_n ~ q(· | prompt, y_<n)`` with ``log q = sampling_log_probs(logits / T)``
    (top-k, then top-p, renormalised), each row until its EOS or ``max_new_tokens``.

    Args:
      graphdef: the model's graph definition (static), from ``nnx.split(model)``.
      params: the model's state from the same split (a pytree; the ``nnx.Param`` part
        alone suffices for a model without other state).
      prompt_tokens: ``[B, P]`` int, left-padded prompts.
      prompt_mask: ``[B, P]``, 1 on real prompt tokens; each row has at least one.
      rng: a JAX PRNG key; the same key gives the same samples.
      config: static sampling settings.

    Returns:
      A ``SampleOutput`` of ``[B, P + max_new_tokens]`` arrays.
    """
    return _generate(
        (graphdef,),
        (params,),
        jnp.ones((1,), jnp.float32),
        prompt_tokens,
        prompt_mask,
        rng,
        config,
    )


@functools.partial(jax.jit, static_argnames=("graphdefs", "config"))
def sample_combined(
    graphdefs: tuple[nnx.GraphDef, ...],
    params: tuple[Any, ...],
    weights: Array,
    prompt_tokens: Array,
    prompt_mask: Array,
    rng: Array,
    *,
    config: SamplingConfig,
) -> SampleOutput:
    """Sample from the normalised weighted product of several models' distributions.

    At every step ``log q = sampling_log_probs(Σ_i w_i · log_softmax(logits_i) / T)``,
    i.e. ``q ∝ (Π_i π_i^{w_i})^{1/T}`` before top-k / top-p; each model keeps its own KV
    cache. Nash-MD's alternative policy, the geometric mixture ``π^{1-β} · π_ref^β``
    (Munos et al., 2024, "Nash Learning from Human Feedback"), is
    ``weights = (1 - β, β)``; weights ``(1, 0)`` reproduce ``sample`` with the first model.

    Args:
      graphdefs: the models' graph definitions (static tuple).
      params: the models' states, a tuple aligned with ``graphdefs``.
      weights: ``[M]`` exponents (traced: changing them does not recompile).
      prompt_tokens: ``[B, P]`` int, left-padded prompts.
      prompt_mask: ``[B, P]``, 1 on real prompt tokens; each row has at least one.
      rng: a JAX PRNG key.
      config: static sampling settings.

    Returns:
      A ``SampleOutput`` whose ``logprobs`` are under the combined distribution ``q``.
    """
    chex.assert_shape(weights, (len(graphdefs),))
    return _generate(
        tuple(graphdefs), tuple(params), weights, prompt_tokens, prompt_mask, rng, config
    )
