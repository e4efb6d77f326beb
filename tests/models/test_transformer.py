import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import Decoder, KVCache, ModelConfig
from rlhf_jax.models.transformer import dropout

LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", None}

CONFIGS = {
    # Grouped-query attention, untied head, every optional bias switched on.
    "llama": ModelConfig.llama(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden_size=48,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
    ),
    "qwen2": ModelConfig.qwen2(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        mlp_hidden_size=48,
        tie_embeddings=True,
    ),
    "gpt2": ModelConfig.gpt2(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32
    ),
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family_model(request, make_forward, make_noisy_decoder):
    """``(model, jitted forward)``: RoPE + GQA and learned positions + LayerNorm."""
    model = make_noisy_decoder(CONFIGS[request.param])
    return model, make_forward(model)


def _batch(vocab_size: int):
    """The same 7 tokens right-padded (row 0) and left-padded (row 1) to length 10."""
    sequence = np.random.RandomState(1).randint(0, vocab_size, 7)
    tokens = np.zeros((2, 10), np.int32)
    tokens[0, :7] = sequence
    tokens[1, 3:] = sequence
    mask = tokens != 0
    mask[0, :7] = mask[1, 3:] = True
    return tokens, mask


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_parameter_has_logical_axis_names(family):
    model = nnx.eval_shape(lambda: Decoder(CONFIGS[family], rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    shapes = dict(nnx.to_flat_state(params))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        names = tuple(spec.get_value())
        assert len(names) == shapes[path].get_value().ndim, path
        assert set(names) <= LOGICAL_NAMES, path
    expected = {
        ("token_embedding",): ("vocab", "embed"),
        ("layers", 0, "attn", "query", "kernel"): ("embed", "heads", "head_dim"),
        ("layers", 1, "attn", "key", "kernel"): ("embed", "kv_heads", "head_dim"),
        ("layers", 0, "attn", "out", "kernel"): ("heads", "head_dim", "embed"),
        ("layers", 0, "mlp", "down", "kernel"): ("mlp", "embed"),
        ("final_norm", "scale"): ("embed",),
    }
    for path, names in expected.items():
        assert tuple(specs[path].get_value()) == names, path


def test_decoder_builds_outside_and_inside_a_mesh():
    config = CONFIGS["qwen2"]
    outside = Decoder(config, rngs=nnx.Rngs(0))  # eager, no mesh: must not raise
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    with jax.set_mesh(mesh):
        inside = Decoder(config, rngs=nnx.Rngs(0))  # eager, in a mesh: not sharded eagerly
        rules = [("vocab", "model"), ("embed", None), ("mlp", "model"), ("heads", "model")]
        rules += [("kv_heads", None), ("head_dim", None)]
        with nnx.logical_axis_rules(rules):
            abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(inside), nnx.state(outside))
    # Under logical-axis rules the logical names resolve to mesh axes.
    assert abstract.token_embedding.get_value().sharding.spec == P("model", None)
    query_kernel = abstract.layers[0].attn.query.kernel.get_value()
    assert query_kernel.sharding.spec == P(None, "model", None)


def test_cached_decoding_equals_full_forward(family_model):
    model, forward = family_model
    tokens, mask = _batch(model.config.vocab_size)
    B, L = tokens.shape
    S = 12  # two cache slots are never written: the causal bound must hide them
    full_logits = forward(tokens, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    slot_mask = np.concatenate([mask, np.ones((B, S - L), bool)], axis=1)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def step(params, cache, tokens, positions, index):
        return nnx.merge(graphdef, params)(
            tokens,
            positions=positions,
            attention_mask=jnp.asarray(slot_mask),
            cache=cache,
            cache_index=index,
        )

    cache = model.init_cache(B, S)
    assert isinstance(cache, KVCache) and len(cache.keys) == model.config.num_layers
    K, D = model.config.num_kv_heads, model.config.head_dim
    assert cache.keys[0].shape == (B, K, D, S) and cache.values[0].shape == (B, K, S, D)
    chunks = [(0, 5), (5, 7), (7, 8), (8, 9), (9, 10)]  # prefill, a 2-token chunk, 1 by 1
    outputs = []
    for start, stop in chunks:
        logits, cache = step(
            params, cache, tokens[:, start:stop], positions[:, start:stop], jnp.int32(start)
        )
        outputs.append(np.asarray(logits))
    cached_logits = np.concatenate(outputs, axis=1)
    # Same float32 arithmetic up to the masked (exactly zero) softmax entries of unused
    # slots and reassociation in XLA's fused reductions: a few ulps of O(1) logits.
    np.testing.assert_allclose(cached_logits[mask], full_logits[mask], atol=1e-5)


def test_padding_side_and_pad_ids_do_not_change_real_token_logits(family_model):
    model, forward = family_model
    tokens, mask = _batch(model.config.vocab_size)
    logits = forward(tokens, mask)
    # Positions follow the mask and pad keys are masked out: the same 7 tokens give the
    # same logits right- and left-padded, up to float32 reassociation.
    np.testing.assert_allclose(logits[1, 3:], logits[0, :7], atol=1e-5)
    repadded = tokens.copy()
    repadded[~mask] = 5
    np.testing.assert_allclose(forward(repadded, mask)[mask], logits[mask], atol=1e-5)


def test_causal_attention_ignores_future_tokens(family_model):
    model, forward = family_model
    tokens, mask = _batch(model.config.vocab_size)
    changed = tokens.copy()
    changed[0, 5:7] = (changed[0, 5:7] + 1) % model.config.vocab_size
    np.testing.assert_allclose(
        forward(changed, mask)[0, :5], forward(tokens, mask)[0, :5], atol=1e-6
    )
    assert np.abs(forward(changed, mask)[0, 5:7] - forward(tokens, mask)[0, 5:7]).max() > 1e-3


def test_hidden_then_logits_equals_call(family_model):
    model, forward = family_model
    tokens, mask = _batch(model.config.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def via_hidden(params, tokens, mask):
        decoder = nnx.merge(graphdef, params)
        hidden = decoder.hidden(tokens, attention_mask=mask)
        return hidden, decoder.logits_from_hidden(hidden)

    hidden, logits = via_hidden(params, tokens, mask)
    assert hidden.shape == (2, 10, model.config.hidden_size)
    np.testing.assert_allclose(logits, forward(tokens, mask), atol=1e-6)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_is_close_to_float32(param_dtype, make_forward, make_noisy_decoder):
    config = CONFIGS["llama"]
    reference_model = make_noisy_decoder(config)
    tokens, mask = _batch(config.vocab_size)
    reference = make_forward(reference_model)(tokens, mask)
    params = nnx.state(reference_model, nnx.Param)
    bf16_config = config.replace(dtype="bfloat16", param_dtype=param_dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(bf16_config, rngs=nnx.Rngs(0))))
    bf16_model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(param_dtype), params))
    logits = make_forward(bf16_model)(tokens, mask)
    assert logits.dtype == np.float32
    assert bf16_model.init_cache(2, 4).keys[0].dtype == jnp.bfloat16
    # bfloat16 keeps 8 significand bits: each rounding errs by at most 2^-9 ≈ 0.2%
    # (relative). About a dozen roundings chain on the way to a logit (embedding, norms,
    # q/k/v, attention, output and MLP projections, twice), so the worst logit may be off
    # by ~2-3% of the logit scale while the typical one stays near a single rounding.
    scale = np.abs(reference[mask]).max()
    error = np.abs(logits[mask] - reference[mask])
    assert error.max() < 0.03 * scale, (error.max(), scale)
    assert error.mean() < 0.005 * scale, (error.mean(), scale)


def test_cache_requires_positions_and_index():
    model = nnx.eval_shape(lambda: Decoder(CONFIGS["gpt2"], rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="positions"):
        model(jnp.zeros((1, 1), jnp.int32), cache=model.init_cache(1, 4), cache_index=0)


@pytest.fixture(scope="module")
def dropout_forward(make_noisy_decoder, make_forward):
    """``(f(key, rate) -> logits, logits without dropout, mask)`` on :func:`_batch`."""
    model = make_noisy_decoder(CONFIGS["llama"])
    graphdef, params = nnx.split(model, nnx.Param)
    tokens, mask = _batch(model.config.vocab_size)

    @functools.partial(jax.jit, static_argnames="rate")
    def forward(params, key, rate):
        logits, _ = nnx.merge(graphdef, params)(
            tokens, attention_mask=mask, dropout_rate=rate, dropout_key=key
        )
        return logits

    plain = make_forward(model)(tokens, mask)
    return lambda key, rate: np.asarray(forward(params, key, rate)), plain, mask


def test_dropout_rate_zero_with_a_key_is_the_deterministic_forward(dropout_forward):
    forward, plain, _ = dropout_forward
    # Rate 0 leaves the program unchanged (the key is never read): equal bit for bit.
    np.testing.assert_array_equal(forward(jax.random.key(3), 0.0), plain)


def test_dropout_masks_follow_the_key(dropout_forward):
    forward, plain, mask = dropout_forward
    first = forward(jax.random.key(1), 0.2)
    np.testing.assert_array_equal(forward(jax.random.key(1), 0.2), first)
    second = forward(jax.random.key(2), 0.2)
    # O(1) logits: dropping a fifth of the residual stream moves them by O(0.1) or more,
    # far beyond any rounding, and two keys draw different masks.
    assert np.abs(first - plain)[mask].mean() > 1e-2
    assert np.abs(first - second)[mask].mean() > 1e-2


def test_inverted_dropout_of_embedding_activations(make_noisy_decoder):
    model = make_noisy_decoder(CONFIGS["llama"])
    tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (64, 64))
    activations = np.asarray(model.token_embedding[...])[tokens]  # [64, 64, 32], no zeros
    assert np.all(activations != 0)
    rate = 0.25
    dropped = np.asarray(dropout(jnp.asarray(activations), rate, jax.random.key(0)))
    zeroed = dropped == 0
    n = zeroed.size
    # Each of the n = 131072 activations is dropped independently with probability p:
    # the zero fraction has standard deviation √(p(1 − p)/n) ≈ 0.0012; allow 5 of them.
    assert abs(zeroed.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    # Survivors are scaled by 1/(1 − p) (float32 division: 1 ulp) ...
    np.testing.assert_allclose(dropped[~zeroed], activations[~zeroed] / (1 - rate), rtol=1e-6)
    # ... so the mean is preserved: Var(out_i) = x_i² p/(1 − p), and the mean of n
    # independent outputs stays within 5 standard deviations of the mean of the inputs.
    spread = np.sqrt(np.sum(activations.astype(np.float64) ** 2) * rate / (1 - rate)) / n
    assert abs(dropped.mean() - activations.mean()) < 5 * spread
    inputs = jnp.asarray(activations)
    assert dropout(inputs, 0.0, None) is inputs  # rate 0: no mask drawn, no key needed


def test_dropout_refuses_a_cache_and_a_missing_key():
    model = nnx.eval_shape(lambda: Decoder(CONFIGS["gpt2"], rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"dropout_rate=0\.1 cannot be combined with a cache"):
        model(
            tokens,
            positions=jnp.zeros((1, 2), jnp.int32),
            cache=model.init_cache(1, 4),
            cache_index=0,
            dropout_rate=0.1,
            dropout_key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="needs a dropout_key"):
        dropout(jnp.ones(3), 0.1, None)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dropout(jnp.ones(3), 1.0, jax.random.key(0))
