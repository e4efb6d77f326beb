"""A pre-norm decoder-only transformer in Flax NNX (Llama, Qwen2 and GPT-2 by config).

Each block computes ``x ← x + Attn(Norm(x))`` then ``x ← x + MLP(Norm(x))`` (Radford et
al. 2019; Touvron et al. 2023), followed by a final norm and the output projection.
Attention is causal scaled dot-product attention (Vaswani et al. 2017),
``softmax(q kᵀ / √D + mask) v``, with grouped-query attention (Ainslie et al. 2023): the
``H`` query heads are viewed as ``[K, H/K]`` so that each group reads its key/value head
without K/V being repeated in memory. Rotary position embeddings (Su et al. 2021, eq. 34)
rotate the two halves of every q/k head by the angle ``p · θ^(-2i/D)``.

Every parameter carries logical axis names (``'vocab'``, ``'embed'``, ``'mlp'``,
``'heads'``, ``'kv_heads'``, ``'head_dim'`` or ``None``) as sharding metadata, so
``nnx.get_partition_spec(nnx.state(model))`` yields the logical layout that the parallel
layer maps onto a mesh. Parameters are created unsharded (``eager_sharding=False``), so
a model can be built eagerly with or without a mesh; place them afterwards with the
partition specs. For large models build abstractly instead: under ``jax.set_mesh(mesh)``
and ``nnx.logical_axis_rules(rules)``, ``nnx.eval_shape(lambda: Decoder(config, rngs=...))``
gives parameters whose shardings are the logical names resolved to mesh axes (without
rules, ``nnx.eval_shape`` under a mesh rejects the logical names), ready for a jitted
initialisation with ``out_shardings`` or a checkpoint restore.

With a cache, writes past the last slot are clamped by ``lax.dynamic_update_slice``:
callers keep ``cache_index + T <= S``.

Dropout is a call-time option of the cache-free forward (:meth:`Decoder.hidden`,
:meth:`Decoder.__call__`), off by default: with ``dropout_rate = p > 0`` and a key, inverted
dropout (Srivastava et al. 2014; each unit kept with probability ``1 − p`` and scaled by
``1/(1 − p)``, so its expectation is unchanged) is applied as residual dropout
(Vaswani et al. 2017, §5.4; GPT-2's embedding and residual dropout, Radford et al. 2019,
without its dropout of attention probabilities): on the embedding output, and on the
output of every attention and MLP branch before it is added to the residual stream
(Llama checkpoints are trained without dropout; the same sites serve them). The
parameters are the same with and without dropout, and ``p = 0`` runs exactly the
deterministic program.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` cache slots, ``E`` width, ``H`` query heads,
``K`` key/value heads, ``G = H / K``, ``D`` head width, ``M`` MLP width, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import Array

from rlhf_jax.models.config import ModelConfig

_INIT_STDDEV = 0.02
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)
AxisNames = Sequence[str | None]


def logical_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    names: AxisNames,
    dtype: jnp.dtype,
    init: jax.nn.initializers.Initializer,
) -> nnx.Param:
    """An unsharded ``nnx.Param`` annotated with logical axis ``names``.

    Args:
      rngs: random streams (the ``params`` stream is used); ``None`` for constant inits.
      shape: parameter shape.
      names: one logical axis name (or ``None``) per dimension.
      dtype: storage dtype.
      init: initialiser ``init(key, shape, dtype)``.

    Returns:
      The parameter, with ``out_sharding=names`` metadata and eager sharding disabled.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match parameter shape {shape}.")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(
        init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False
    )


class Projection(nnx.Module):
    """A dense map contracting the trailing input axes of ``x`` with ``kernel``.

    ``y = tensordot(x, kernel, len(in_shape)) + bias`` with
    ``kernel: in_shape + out_shape`` and ``bias: out_shape``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_names: AxisNames,
        out_names: AxisNames,
        *,
        use_bias: bool,
        config: ModelConfig,
        rngs: nnx.Rngs,
    ):
        self.num_in_axes = len(in_shape)
        self.dtype = jnp.dtype(config.dtype)
        param_dtype = jnp.dtype(config.param_dtype)
        self.kernel = logical_param(
            rngs,
            (*in_shape, *out_shape),
            (*in_names, *out_names),
            param_dtype,
            nnx.initializers.normal(_INIT_STDDEV),
        )
        self.bias = (
            logical_param(rngs, out_shape, out_names, param_dtype, nnx.initializers.zeros)
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        """Apply the projection in the compute dtype.

        The contraction is one 2-D matmul ``[N, I] @ [I, O]`` over the flattened leading
        axes (``N``) and the flattened input (``I``) and output (``O``) axes; both reshapes
        are free. Written as a tensordot over 3-D operands instead, XLA's CPU backend
        transposes the activation and its gradient before each weight-gradient matmul
        (``[B, T, ·] → [·, B, T]``), copies that cost about a sixth of a training step
        (``benchmarks/dpo_step.py``); the 2-D form needs none.
        """
        kernel = self.kernel[...].astype(self.dtype)
        in_shape = kernel.shape[: self.num_in_axes]
        out_shape = kernel.shape[self.num_in_axes :]
        lead = x.shape[: x.ndim - self.num_in_axes]
        y = jnp.dot(
            x.astype(self.dtype).reshape(math.prod(lead), math.prod(in_shape)),
            kernel.reshape(math.prod(in_shape), math.prod(out_shape)),
        ).reshape(*lead, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016), computed in float32.

    RMSNorm: ``x / √(mean(x²) + ε) · g``; LayerNorm: ``(x − μ) / √(σ² + ε) · g + b``.
    """

    def __init__(self, config: ModelConfig):
        self.kind = config.norm
        self.eps = config.norm_eps
        self.dtype = jnp.dtype(config.dtype)
        param_dtype = jnp.dtype(config.param_dtype)
        width = config.hidden_size
        self.scale = logical_param(None, (width,), ("embed",), param_dtype, nnx.initializers.ones)
        self.bias = (
            logical_param(None, (width,), ("embed",), param_dtype, nnx.initializers.zeros)
            if config.norm == "layernorm"
            else None
        )

    def __call__(self, x: Array) -> Array:
        """Normalise the last axis of ``x``; returns the compute dtype."""
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021) in the rotate-half layout used by Llama.

    With ``x = [x₁, x₂]`` split in halves along the head axis and angles
    ``a_i = p · θ^(-2i/D)``: ``[x₁ cos a − x₂ sin a, x₂ cos a + x₁ sin a]``.

    Args:
      x: ``[B, T, N, D]`` queries or keys.
      positions: ``[B, T]`` integer positions.
      theta: the RoPE base θ.

    Returns:
      The rotated ``x`` in its own dtype.
    """
    chex.assert_rank(x, 4)
    chex.assert_equal_shape_prefix((x, positions), 2)
    half = x.shape[-1] // 2
    inverse_frequency = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[:, :, None, None] * inverse_frequency
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


@struct.dataclass
class KVCache:
    """Per-layer key/value cache.

    Per (row, key/value head) the cache holds ``Kᵀ`` as a ``[D, S]`` matrix and ``V`` as
    an ``[S, D]`` one, exactly the right-hand operands of the two batched matmuls
    ``q Kᵀ`` and ``p V``, so attention reads the cache in place. (A ``[B, S, K, D]``
    layout made XLA transpose the whole cache of every layer at every decoding step.)

    Attributes:
      keys: one ``[B, K, D, S]`` array per layer (transposed keys), in the compute dtype.
      values: one ``[B, K, S, D]`` array per layer, in the compute dtype.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]

    @property
    def max_length(self) -> int:
        """Number of cache slots ``S``."""
        return self.values[0].shape[2]


class Attention(nnx.Module):
    """Grouped-query causal self-attention with optional RoPE and a KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E, H, K, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        common = {"config": config, "rngs": rngs}
        self.query = Projection(
            (E,), (H, D), ("embed",), ("heads", "head_dim"), use_bias=config.qkv_bias, **common
        )
        self.key = Projection(
            (E,), (K, D), ("embed",), ("kv_heads", "head_dim"), use_bias=config.qkv_bias, **common
        )
        self.value = Projection(
            (E,), (K, D), ("embed",), ("kv_heads", "head_dim"), use_bias=config.qkv_bias, **common
        )
        self.out = Projection(
            (H, D),
            (E,),
            ("heads", "head_dim"),
            ("embed",),
            use_bias=config.attn_out_bias,
            **common,
        )

    def __call__(
        self,
        x: Array,
        positions: Array,
        key_mask: Array,
        cached: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """Attend from the ``T`` new tokens to the new (or cached) keys.

        Args:
          x: ``[B, T, E]`` normed inputs.
          positions: ``[B, T]`` positions (used by RoPE).
          key_mask: ``[B, T, S]`` boolean, true where query t may read key s.
          cached: ``(keys [B, K, D, S], values [B, K, S, D])``, or ``None`` (then
            ``S = T``).
          cache_index: slot of the first new token when ``cached`` is given.

        Returns:
          ``([B, T, E], (keys [B, K, D, S], values [B, K, S, D]))``: the keys and values
          that were attended to, in the cache layout.
        """
        config = self.config
        B, T, _ = x.shape
        K, G, D = config.num_kv_heads, config.num_groups, config.head_dim
        q, k, v = self.query(x), self.key(x), self.value(x)
        if config.position == "rope":
            q = apply_rope(q, positions, config.rope_theta)
            k = apply_rope(k, positions, config.rope_theta)
        # Into the cache layout (only the new tokens move): Kᵀ [B, K, D, T], V [B, K, T, D].
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        if cached is not None:
            k = jax.lax.dynamic_update_slice(
                cached[0], k.astype(cached[0].dtype), (0, 0, 0, cache_index)
            )
            v = jax.lax.dynamic_update_slice(
                cached[1], v.astype(cached[1].dtype), (0, 0, cache_index, 0)
            )
        q = q * jnp.asarray(1.0 / math.sqrt(D), q.dtype)
        # Each key/value head serves the T·G queries of its group: [B, K, T·G, D], so both
        # products below are plain batched matmuls over (B, K) with no operand transposed.
        q = q.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, D)
        scores = jnp.einsum("bkqd,bkds->bkqs", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(B, K, T, G, -1)
        scores = jnp.where(key_mask[:, None, :, None, :], scores, _MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, T * G, -1)
        context = jnp.einsum("bkqs,bksd->bkqd", probs, v)
        context = context.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4)
        context = context.reshape(B, T, config.num_heads, D)
        return self.out(context), (k, v)


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate x) ⊙ up x)`` (Shazeer 2020) or GPT-2's ``proj(gelu(fc x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E, M = config.hidden_size, config.mlp_hidden_size
        self.activation = config.activation
        common = {"use_bias": config.mlp_bias, "config": config, "rngs": rngs}
        self.up = Projection((E,), (M,), ("embed",), ("mlp",), **common)
        self.gate = (
            Projection((E,), (M,), ("embed",), ("mlp",), **common)
            if config.activation == "swiglu"
            else None
        )
        self.down = Projection((M,), (E,), ("mlp",), ("embed",), **common)

    def __call__(self, x: Array) -> Array:
        """Apply the feed-forward block to ``[..., E]``."""
        if self.gate is not None:
            hidden = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            hidden = jax.nn.gelu(self.up(x), approximate=True)
        return self.down(hidden)


class Block(nnx.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x: Array,
        positions: Array,
        key_mask: Array,
        cached: tuple[Array, Array] | None,
        cache_index: Array | None,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """``x + Drop(Attn(Norm x))`` then ``+ Drop(MLP(Norm ·))``; also returns the K/V.

        The two branches draw their masks from ``fold_in(dropout_key, 0)`` and
        ``fold_in(dropout_key, 1)``; ``dropout_rate = 0`` leaves them untouched.
        """
        attended, kv = self.attn(self.attn_norm(x), positions, key_mask, cached, cache_index)
        x = x + dropout(attended, dropout_rate, site_key(dropout_key, 0))
        mlp_out = self.mlp(self.mlp_norm(x))
        return x + dropout(mlp_out, dropout_rate, site_key(dropout_key, 1)), kv


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout: ``x · m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` elementwise.

    Srivastava et al. (2014); the ``1/(1 − p)`` scaling at training time keeps
    ``E[output] = x``, so evaluation uses the network unchanged.

    Args:
      x: any array.
      rate: the drop probability ``p`` in ``[0, 1)``, a Python float (static).
      key: PRNG key of the mask; may be ``None`` only when ``rate == 0``.

    Returns:
      ``x`` itself when ``rate == 0``; otherwise the dropped-out array in ``x``'s dtype.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    if rate == 0.0:
        return x
    if key is None:
        raise ValueError(f"dropout rate {rate} > 0 needs a dropout_key.")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def site_key(key: Array | None, index: int) -> Array | None:
    """``fold_in(key, index)``: the key of one dropout site (``None`` stays ``None``)."""
    return None if key is None else jax.random.fold_in(key, index)


def default_positions(attention_mask: Array) -> Array:
    """Positions ``max(cumsum(mask) − 1, 0)``: left padding does not shift real tokens."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only language model (token embedding, blocks, final norm, output projection).

    Args:
      config: the architecture.
      rngs: random streams for initialisation (``params`` stream).

    Parameters (logical axes): ``token_embedding [V, E] ('vocab', 'embed')``;
    ``position_embedding [P, E] (None, 'embed')`` for learned positions;
    ``layers[i]`` blocks; ``final_norm``; ``lm_head [E, V] ('embed', 'vocab')`` unless
    the embeddings are tied.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        init = nnx.initializers.normal(_INIT_STDDEV)
        V, E = config.vocab_size, config.hidden_size
        self.token_embedding = logical_param(rngs, (V, E), ("vocab", "embed"), param_dtype, init)
        self.position_embedding = (
            logical_param(
                rngs, (config.max_position_embeddings, E), (None, "embed"), param_dtype, init
            )
            if config.position == "learned"
            else None
        )
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = Norm(config)
        self.lm_head = (
            None
            if config.tie_embeddings
            else logical_param(rngs, (E, V), ("embed", "vocab"), param_dtype, init)
        )

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A zero cache: per layer, keys ``[B, K, D, S]`` and values ``[B, K, S, D]``."""
        config = self.config
        B, K, S, D = batch_size, config.num_kv_heads, max_length, config.head_dim
        keys = tuple(jnp.zeros((B, K, D, S), config.dtype) for _ in range(config.num_layers))
        values = tuple(jnp.zeros((B, K, S, D), config.dtype) for _ in range(config.num_layers))
        return KVCache(keys=keys, values=values)

    def _trunk(
        self,
        tokens: Array,
        positions: Array | None,
        attention_mask: Array | None,
        cache: KVCache | None,
        cache_index: Array | None,
        segment_ids: Array | None = None,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        chex.assert_rank(tokens, 2)
        B, T = tokens.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("Decoder: segment_ids (packed rows) cannot be combined with a cache.")
        if dropout_rate > 0.0 and cache is not None:
            raise ValueError(
                f"Decoder: dropout_rate={dropout_rate} cannot be combined with a cache; "
                "dropout is for the training forward (no cache), decoding runs with rate 0."
            )
        if cache is None:
            if attention_mask is None:
                attention_mask = jnp.ones((B, T), jnp.bool_)
            chex.assert_shape(attention_mask, (B, T))
            attention_mask = attention_mask.astype(jnp.bool_)
            if positions is None:
                positions = default_positions(attention_mask)
            causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
            key_mask = causal[None] & attention_mask[:, None, :]
            if segment_ids is not None:
                chex.assert_shape(segment_ids, (B, T))
                key_mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        else:
            if positions is None or cache_index is None:
                raise ValueError(
                    "Decoder with a cache needs positions [B, T] and an int32 cache_index."
                )
            S = cache.max_length
            if attention_mask is None:
                attention_mask = jnp.ones((B, S), jnp.bool_)
            chex.assert_shape(attention_mask, (B, S))
            cache_index = jnp.asarray(cache_index, jnp.int32)
            query_slots = cache_index + jnp.arange(T, dtype=jnp.int32)
            causal = jnp.arange(S, dtype=jnp.int32)[None, :] <= query_slots[:, None]
            key_mask = causal[None] & attention_mask.astype(jnp.bool_)[:, None, :]
        chex.assert_shape(positions, (B, T))
        dtype = jnp.dtype(self.config.dtype)
        x = self.token_embedding[...][tokens].astype(dtype)
        if self.position_embedding is not None:
            x = x + self.position_embedding[...][positions].astype(dtype)
        x = dropout(x, dropout_rate, site_key(dropout_key, 0))
        new_keys, new_values = [], []
        for index, layer in enumerate(self.layers):
            cached = None if cache is None else (cache.keys[index], cache.values[index])
            x, (k, v) = layer(
                x,
                positions,
                key_mask,
                cached,
                cache_index,
                dropout_rate,
                site_key(dropout_key, index + 1),
            )
            new_keys.append(k)
            new_values.append(v)
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values))
        return self.final_norm(x), new_cache

    def logits_from_hidden(self, hidden: Array) -> Array:
        """Float32 logits ``[..., V]`` from final-normed hidden states ``[..., E]``.

        One 2-D matmul over the flattened leading axes, as in :class:`Projection`.
        """
        dtype = jnp.dtype(self.config.dtype)
        flat = hidden.astype(dtype).reshape(-1, hidden.shape[-1])
        if self.lm_head is None:
            kernel = self.token_embedding[...].astype(dtype).T
        else:
            kernel = self.lm_head[...].astype(dtype)
        logits = jnp.dot(flat, kernel, preferred_element_type=jnp.float32)
        return logits.reshape(*hidden.shape[:-1], kernel.shape[-1])

    def hidden(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        segment_ids: Array | None = None,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> Array:
        """Final-normed hidden states ``[B, T, E]`` (no cache), e.g. for scalar heads.

        ``dropout_rate`` and ``dropout_key`` switch on residual dropout (module docstring).
        """
        hidden, _ = self._trunk(
            tokens, positions, attention_mask, None, None, segment_ids, dropout_rate, dropout_key
        )
        return hidden

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int | None = None,
        segment_ids: Array | None = None,
        dropout_rate: float = 0.0,
        dropout_key: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Next-token logits for ``tokens`` (and the updated cache when one is given).

        Without a cache, query t attends to keys s ≤ t whose ``attention_mask[b, s]`` is
        set (``attention_mask`` is ``[B, T]``); positions default to
        ``max(cumsum(mask) − 1, 0)`` so left padding keeps the real tokens' positions.
        A packed row (several sequences per row) passes ``segment_ids`` ``[B, T]``: query
        t then also needs ``segment_ids[b, s] == segment_ids[b, t]``, a block-diagonal
        causal mask, so each packed sequence is computed exactly as if it were alone
        (with its own positions restarting at 0).

        With a cache (keys ``[B, K, D, S]`` and values ``[B, K, S, D]`` per layer), the new
        keys/values are written at slots ``cache_index … cache_index + T − 1`` and query t
        attends to slots ``s ≤ cache_index + t`` whose ``attention_mask[b, s]`` is set
        (``attention_mask`` is then ``[B, S]`` over the slots); ``positions`` must be given.

        Args:
          tokens: ``[B, T]`` int32 token ids.
          positions: ``[B, T]`` int32 positions.
          attention_mask: ``[B, T]`` (no cache) or ``[B, S]`` (cache); true/1 = real token.
          cache: a :class:`KVCache` from :meth:`init_cache`, or ``None``.
          cache_index: int32 scalar (may be traced), the first slot written.
          segment_ids: ``[B, T]`` int ids of the packed sequences (no cache only).
          dropout_rate: residual dropout probability p in ``[0, 1)`` (a Python float; no
            cache only). The embedding output uses the mask of ``fold_in(dropout_key, 0)``
            and block ``i`` the keys ``fold_in(fold_in(dropout_key, i + 1), 0 | 1)`` for
            its attention and MLP branches. ``0`` (the default) is the deterministic
            forward, bit for bit.
          dropout_key: PRNG key of the dropout masks; needed when ``dropout_rate > 0``.

        Returns:
          ``(logits [B, T, V] float32, updated cache or None)``.

        Raises:
          ValueError: ``dropout_rate > 0`` with a cache, or without a ``dropout_key``.
        """
        hidden, new_cache = self._trunk(
            tokens,
            positions,
            attention_mask,
            cache,
            cache_index,
            segment_ids,
            dropout_rate,
            dropout_key,
        )
        return self.logits_from_hidden(hidden), new_cache
