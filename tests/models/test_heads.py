import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import (
    Decoder,
    ModelConfig,
    PolicyWithValueHead,
    ScalarModel,
    last_token_index,
    sequence_score,
)

CONFIG = ModelConfig.llama(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden_size=48
)


def _batch():
    """The same 6 tokens right-padded (row 0) and left-padded (row 1) to length 9."""
    sequence = np.random.RandomState(3).randint(1, CONFIG.vocab_size, 6)
    tokens = np.zeros((2, 9), np.int32)
    tokens[0, :6] = sequence
    tokens[1, 3:] = sequence
    return tokens, tokens != 0


@pytest.fixture(scope="module")
def scalar_model(make_noisy_params):
    graphdef, params = make_noisy_params(lambda: ScalarModel(CONFIG, rngs=nnx.Rngs(0)))

    @jax.jit
    def run(params, tokens, mask):
        model = nnx.merge(graphdef, params)
        return (
            model(tokens, attention_mask=mask),
            model.score(tokens, mask),
            model.trunk.hidden(tokens, attention_mask=mask),
        )

    return nnx.merge(graphdef, params), lambda tokens, mask: run(params, tokens, mask)


def test_scalar_model_is_a_linear_head_on_the_trunk(scalar_model):
    model, run = scalar_model
    tokens, mask = _batch()
    values, scores, hidden = map(np.asarray, run(tokens, mask))
    assert values.shape == (2, 9) and values.dtype == np.float32
    kernel = np.asarray(model.head.kernel[...], np.float64)
    bias = np.asarray(model.head.bias[...], np.float64)
    expected = np.asarray(hidden, np.float64) @ kernel[:, 0] + bias[0]
    # float32 dot products of width 32 on O(1) features: ~1e-6 relative error.
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # The score is the value at the last real token, whichever side is padded.
    np.testing.assert_allclose(scores, [values[0, 5], values[1, 8]], atol=0)
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


def test_last_token_index_and_sequence_score_match_a_loop():
    rng = np.random.RandomState(0)
    mask = rng.rand(5, 7) < 0.6
    mask[0] = False  # an empty row scores its first position
    scalars = rng.randn(5, 7).astype(np.float32)
    expected_index = [max([t for t in range(7) if mask[b, t]], default=0) for b in range(5)]
    np.testing.assert_array_equal(last_token_index(jnp.asarray(mask)), expected_index)
    np.testing.assert_array_equal(
        sequence_score(jnp.asarray(scalars), jnp.asarray(mask)),
        scalars[np.arange(5), expected_index],
    )


def test_policy_with_value_head_shares_one_trunk_pass(make_noisy_params):
    graphdef, params = make_noisy_params(lambda: PolicyWithValueHead(CONFIG, rngs=nnx.Rngs(0)))
    tokens, mask = _batch()

    @jax.jit
    def run(params, tokens, mask):
        model = nnx.merge(graphdef, params)
        logits, values = model(tokens, attention_mask=mask)
        separate_logits, _ = model.policy(tokens, attention_mask=mask)
        separate_values = model.value_head(model.policy.hidden(tokens, attention_mask=mask))
        return logits, values, separate_logits, separate_values

    logits, values, separate_logits, separate_values = run(params, tokens, mask)
    assert logits.shape == (2, 9, CONFIG.vocab_size) and values.shape == (2, 9)
    np.testing.assert_allclose(logits, separate_logits, atol=1e-6)
    np.testing.assert_allclose(values, separate_values, atol=1e-6)
    # The policy's parameters are the trunk's: no second copy of the decoder.
    n_decoder = sum(
        x.size
        for x in jax.tree.leaves(
            nnx.state(nnx.eval_shape(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0))))
        )
    )
    assert sum(x.size for x in jax.tree.leaves(params)) == n_decoder + CONFIG.hidden_size + 1


def test_head_parameters_have_logical_axis_names():
    model = nnx.eval_shape(lambda: ScalarModel(CONFIG, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["head"]["kernel"].get_value()) == ("embed", None)
    assert tuple(specs["head"]["bias"].get_value()) == (None,)


def test_scalar_model_can_start_from_an_existing_trunk():
    trunk = nnx.eval_shape(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)))
    model = nnx.eval_shape(lambda: ScalarModel(CONFIG, rngs=nnx.Rngs(1), trunk=trunk))
    assert model.trunk.config == CONFIG
    with pytest.raises(ValueError, match="config differs"):
        ScalarModel(CONFIG.replace(num_layers=1), rngs=nnx.Rngs(0), trunk=trunk)


@pytest.fixture(scope="module")
def dropout_views(make_noisy_params):
    """``f(key, rate) -> (scores, representations, per-token values, hidden)`` and the
    plain (no dropout arguments) scores, on :func:`_batch`."""
    graphdef, params = make_noisy_params(lambda: ScalarModel(CONFIG, rngs=nnx.Rngs(0)))
    tokens, mask = _batch()

    @functools.partial(jax.jit, static_argnames="rate")
    def run(params, key, rate):
        model = nnx.merge(graphdef, params)
        dropout = {"dropout_rate": rate, "dropout_key": key}
        scores, representations = model.score_and_representation(tokens, mask, **dropout)
        values = model(tokens, attention_mask=mask, **dropout)
        hidden = model.trunk.hidden(tokens, attention_mask=mask, **dropout)
        return scores, representations, values, hidden

    plain = jax.jit(lambda p: nnx.merge(graphdef, p).score(tokens, mask))(params)
    model = nnx.merge(graphdef, params)
    return (
        lambda key, rate: tuple(map(np.asarray, run(params, key, rate))),
        np.asarray(plain),
        model,
    )


def test_score_and_representation_is_the_head_on_the_last_token_state(dropout_views):
    run, plain, model = dropout_views
    last = [5, 8]  # row 0 right-padded, row 1 left-padded
    kernel = np.asarray(model.head.kernel[...], np.float64)[:, 0]
    bias = float(model.head.bias[...][0])
    for rate in (0.0, 0.3):
        scores, representations, values, hidden = run(jax.random.key(7), rate)
        assert representations.shape == (2, CONFIG.hidden_size)
        # The same trunk pass under the same key (same masks): equal up to XLA's
        # reassociation across the fused programs, i.e. a few float32 ulps.
        np.testing.assert_allclose(representations, hidden[[0, 1], last], atol=1e-6)
        np.testing.assert_allclose(scores, values[[0, 1], last], atol=1e-6)
        # The score is the linear head on the representation (width-32 float32 dot).
        np.testing.assert_allclose(scores, representations @ kernel + bias, atol=1e-5)
    # Rate 0 with a key is the model without dropout, bit for bit.
    np.testing.assert_array_equal(run(jax.random.key(7), 0.0)[0], plain)
    np.testing.assert_array_equal(run(jax.random.key(8), 0.0)[0], plain)
    # Rate 0.3: O(1) scores move well beyond rounding, and differently per key.
    dropped = run(jax.random.key(7), 0.3)[0]
    assert np.abs(dropped - plain).max() > 1e-2
    assert np.abs(dropped - run(jax.random.key(8), 0.3)[0]).max() > 1e-2
