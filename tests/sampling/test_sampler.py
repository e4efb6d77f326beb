"""The cached sampler against uncached forward passes of the same tiny decoder."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.models.transformer import Decoder
from rlhf_jax.sampling import sampler as sampler_module
from rlhf_jax.sampling.sampler import SamplingConfig, sample, sample_combined

VOCAB = 64
NEW_TOKENS = 7
NO_EOS = None  # rows run to max_new_tokens
CONFIG = ModelConfig.llama(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_hidden_size=64,
    max_position_embeddings=64,
)
# Left-padded prompts of lengths 6, 3, 1 and 4.
PROMPT_LENGTHS = np.array([6, 3, 1, 4])
PROMPT_MASK = jnp.asarray(np.arange(6)[None, :] >= 6 - PROMPT_LENGTHS[:, None], jnp.int32)
PROMPT_TOKENS = jnp.where(
    PROMPT_MASK == 1, jax.random.randint(jax.random.key(1), PROMPT_MASK.shape, 1, VOCAB), 0
)


def _model(seed, logit_scale):
    """A random decoder whose output projection is scaled so that its logits have a spread
    of a few nats (at the default 0.02 init they are almost uniform)."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * logit_scale
    return nnx.split(model)


@pytest.fixture(scope="module")
def policy():
    return _model(0, logit_scale=10.0)


@pytest.fixture(scope="module")
def reference():
    return _model(1, logit_scale=10.0)


@functools.partial(jax.jit, static_argnums=0)
def _full_log_probs(graphdef, params, tokens, attention_mask):
    logits, _ = nnx.merge(graphdef, params)(tokens, attention_mask=attention_mask)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.pad(log_probs[:, :-1], ((0, 0), (1, 0), (0, 0)))


def full_log_probs(model, out):
    """[B, P+N, V] log_softmax of one uncached forward pass over the produced sequence,
    shifted so that entry t is the distribution of tokens[t] given tokens[<t]."""
    graphdef, params = model
    return _full_log_probs(graphdef, params, out.tokens, out.attention_mask)


def token_log_probs(log_probs, tokens):
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def run(model, rng=0, **settings):
    graphdef, params = model
    config = SamplingConfig(**{"max_new_tokens": NEW_TOKENS, "eos_id": NO_EOS, **settings})
    return sample(graphdef, params, PROMPT_TOKENS, PROMPT_MASK, jax.random.key(rng), config=config)


@pytest.fixture(scope="module")
def sampled(policy):
    return run(policy)


@pytest.fixture(scope="module")
def greedy(policy):
    return run(policy, greedy=True)


def test_layout_is_prompt_then_response(sampled):
    P = PROMPT_TOKENS.shape[1]
    chex.assert_shape(
        [sampled.tokens, sampled.attention_mask, sampled.response_mask, sampled.logprobs],
        (4, P + NEW_TOKENS),
    )
    np.testing.assert_array_equal(sampled.tokens[:, :P], PROMPT_TOKENS)
    np.testing.assert_array_equal(sampled.attention_mask[:, :P], PROMPT_MASK)
    # Without EOS every row generates all N tokens.
    np.testing.assert_array_equal(sampled.response_mask[:, :P], 0)
    np.testing.assert_array_equal(sampled.response_mask[:, P:], 1)
    np.testing.assert_array_equal(sampled.attention_mask[:, P:], 1)
    np.testing.assert_array_equal(sampled.logprobs[:, :P], 0.0)


def test_logprobs_equal_an_uncached_forward_pass(policy, sampled):
    expected = token_log_probs(full_log_probs(policy, sampled), sampled.tokens)
    expected = expected * sampled.response_mask
    # f32: cached and uncached attention sum the same terms in a different order, about
    # 1e-6 on log-probs of magnitude ~5; 1e-4 leaves room across CPUs and XLA versions.
    np.testing.assert_allclose(sampled.logprobs, expected, atol=1e-4, rtol=0)


def test_output_is_the_layout_of_the_trainers_logprob_function(policy, sampled):
    graphdef, params = policy

    @jax.jit
    def per_token(params, tokens, attention_mask, response_mask):
        model = nnx.merge(graphdef, params)
        return sequence_logprobs(model, tokens, attention_mask, response_mask)[0]

    expected = per_token(params, sampled.tokens, sampled.attention_mask, sampled.response_mask)
    # Same f32 tolerance as the parity test above.
    np.testing.assert_allclose(sampled.logprobs, expected, atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_the_uncached_argmax(policy, greedy):
    again = run(policy, rng=123, greedy=True)
    np.testing.assert_array_equal(again.tokens, greedy.tokens)
    argmax = jnp.argmax(full_log_probs(policy, greedy), axis=-1)
    generated = greedy.response_mask == 1
    np.testing.assert_array_equal(np.asarray(greedy.tokens)[generated], argmax[generated])


def test_eos_ends_each_row_and_masks_what_follows(policy, greedy):
    P = PROMPT_TOKENS.shape[1]
    free_run = np.asarray(greedy.tokens[:, P:])
    eos = int(free_run[0, 2])  # a token row 0 emits at its third step
    stopped = run(policy, greedy=True, eos_id=eos)
    assert (free_run == eos).any(axis=1).sum() >= 1
    for row in range(free_run.shape[0]):
        hits = np.flatnonzero(free_run[row] == eos)
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        # The row is the free run up to and including its first EOS, then padding.
        np.testing.assert_array_equal(stopped.tokens[row, P : P + length], free_run[row, :length])
        np.testing.assert_array_equal(stopped.tokens[row, P + length :], 0)
        np.testing.assert_array_equal(stopped.response_mask[row, P : P + length], 1)
        np.testing.assert_array_equal(stopped.response_mask[row, P + length :], 0)
        np.testing.assert_array_equal(stopped.attention_mask[row, P + length :], 0)
        np.testing.assert_array_equal(stopped.logprobs[row, P + length :], 0.0)
        np.testing.assert_allclose(
            stopped.logprobs[row, P : P + length], greedy.logprobs[row, P : P + length], atol=1e-6
        )
    assert stopped.response_mask[0].sum() <= 3
    # The stopped batch (padding after EOS) still scores like an uncached forward pass.
    expected = token_log_probs(full_log_probs(policy, stopped), stopped.tokens)
    np.testing.assert_allclose(
        stopped.logprobs, expected * stopped.response_mask, atol=1e-4, rtol=0
    )


def test_top_k_one_is_greedy(policy, greedy):
    top_1 = run(policy, rng=7, top_k=1)
    np.testing.assert_array_equal(top_1.tokens, greedy.tokens)
    # q is a point mass on the chosen token: log q = 0.
    np.testing.assert_array_equal(top_1.logprobs, 0.0)


def _renormalised_log_probs(log_probs, allowed):
    return jax.nn.log_softmax(jnp.where(allowed, log_probs, -jnp.inf), axis=-1)


def test_top_k_samples_inside_the_top_k_with_renormalised_logprobs(policy):
    k = 5
    out = run(policy, rng=3, top_k=k)
    log_probs = full_log_probs(policy, out)
    kth = jnp.sort(log_probs, axis=-1)[..., -k][..., None]
    allowed = log_probs >= kth
    generated = np.asarray(out.response_mask == 1)
    assert np.asarray(token_log_probs(allowed, out.tokens))[generated].all()
    expected = token_log_probs(_renormalised_log_probs(log_probs, allowed), out.tokens)
    # Same f32 tolerance as the unfiltered parity test.
    np.testing.assert_allclose(out.logprobs, expected * generated, atol=1e-4, rtol=0)


def test_top_p_samples_inside_the_nucleus_with_renormalised_logprobs(policy):
    p = 0.7
    out = run(policy, rng=4, top_p=p)
    log_probs = np.asarray(full_log_probs(policy, out), np.float64)
    # Nucleus recomputed in float64 by sorting: keep j when Σ_{i<j} p_(i) < p.
    order = np.argsort(-log_probs, axis=-1)
    sorted_probs = np.take_along_axis(np.exp(log_probs), order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    allowed = np.zeros_like(log_probs, bool)
    np.put_along_axis(allowed, order, mass_before < p, axis=-1)
    generated = np.asarray(out.response_mask == 1)
    assert np.asarray(token_log_probs(allowed, out.tokens))[generated].all()
    assert allowed[generated].sum(-1).max() > 1, "the nucleus should not be a single token"
    expected = token_log_probs(_renormalised_log_probs(log_probs, allowed), out.tokens)
    np.testing.assert_allclose(out.logprobs, expected * generated, atol=1e-4, rtol=0)


def test_first_token_frequencies_match_the_tempered_softmax(policy):
    graphdef, params = policy
    n, temperature = 2048, 0.5
    # Row 1's prompt without its left padding (length 3), repeated n times.
    prompt = jnp.tile(PROMPT_TOKENS[1:2, 3:], (n, 1))
    mask = jnp.ones_like(prompt)
    config = SamplingConfig(max_new_tokens=1, eos_id=NO_EOS, temperature=temperature)
    out = sample(graphdef, params, prompt, mask, jax.random.key(5), config=config)
    counts = np.bincount(np.asarray(out.tokens[:, -1]), minlength=VOCAB)
    logits, _ = nnx.merge(graphdef, params)(prompt[:1])
    expected = np.asarray(jax.nn.softmax(logits[0, -1] / temperature), np.float64)
    untempered = np.asarray(jax.nn.softmax(logits[0, -1]), np.float64)
    # Each count is Binomial(n, p_v). A margin of 5 standard deviations plus 3 counts is
    # exceeded with probability < 1e-6 per token, both where the normal approximation
    # holds (5 sigma: 6e-7) and in the Poisson regime of rare tokens (n p_v = 1 needs
    # >= 9 counts: 1e-6), so < 1e-4 over the 64 tokens.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 3 / n
    np.testing.assert_array_less(np.abs(counts / n - expected), tolerance)
    # The check has power: T = 1 would put a clearly different mass on some token.
    assert np.max(np.abs(untempered - expected) - tolerance) > 0.02


def test_sampler_compiles_once_per_config_and_shape(policy, reference, monkeypatch):
    graphdef, params = policy
    traced = chex.assert_max_traces(sampler_module._generate, n=1)
    monkeypatch.setattr(sampler_module, "_generate", traced)
    config = SamplingConfig(max_new_tokens=3, eos_id=NO_EOS)  # not compiled elsewhere
    try:
        for seed in range(3):
            prompts = jax.random.randint(jax.random.key(seed), PROMPT_TOKENS.shape, 1, VOCAB)
            mask = jnp.roll(PROMPT_MASK, seed, axis=0)
            new_params = params if seed < 2 else reference[1]
            sample(graphdef, new_params, prompts, mask, jax.random.key(seed), config=config)
        with pytest.raises(AssertionError, match="traced > 1 times"):
            sample(
                graphdef,
                params,
                PROMPT_TOKENS[:2],
                PROMPT_MASK[:2],
                jax.random.key(0),
                config=config,
            )
    finally:
        chex.clear_trace_counter()


def test_combined_sampler_does_not_recompile_for_new_weights(policy, reference, monkeypatch):
    traced = chex.assert_max_traces(sampler_module._generate, n=1)
    monkeypatch.setattr(sampler_module, "_generate", traced)
    config = SamplingConfig(max_new_tokens=2, eos_id=NO_EOS)  # not compiled elsewhere
    try:
        for seed, beta in enumerate([0.0, 0.3, 0.9]):
            prompts = jax.random.randint(jax.random.key(seed), PROMPT_TOKENS.shape, 1, VOCAB)
            sample_combined(
                (policy[0], reference[0]),
                (policy[1], reference[1]),
                jnp.array([1.0 - beta, beta]),
                prompts,
                PROMPT_MASK,
                jax.random.key(seed),
                config=config,
            )
    finally:
        chex.clear_trace_counter()


def test_combined_with_unit_weight_on_the_first_model_is_single_model_sampling(
    policy, reference, sampled
):
    out = sample_combined(
        (policy[0], reference[0]),
        (policy[1], reference[1]),
        jnp.array([1.0, 0.0]),
        PROMPT_TOKENS,
        PROMPT_MASK,
        jax.random.key(0),
        config=SamplingConfig(max_new_tokens=NEW_TOKENS, eos_id=NO_EOS),
    )
    np.testing.assert_array_equal(out.tokens, sampled.tokens)
    np.testing.assert_array_equal(out.response_mask, sampled.response_mask)
    np.testing.assert_array_equal(out.attention_mask, sampled.attention_mask)
    # 1·a + 0·b = a exactly in floating point.
    np.testing.assert_array_equal(out.logprobs, sampled.logprobs)


def test_combined_logprobs_are_the_normalised_geometric_mixture(policy, reference):
    beta = 0.4
    out = sample_combined(
        (policy[0], reference[0]),
        (policy[1], reference[1]),
        jnp.array([1.0 - beta, beta]),
        PROMPT_TOKENS,
        PROMPT_MASK,
        jax.random.key(9),
        config=SamplingConfig(max_new_tokens=NEW_TOKENS, eos_id=NO_EOS),
    )
    mixture = jax.nn.log_softmax(
        (1 - beta) * full_log_probs(policy, out) + beta * full_log_probs(reference, out), axis=-1
    )
    expected = token_log_probs(mixture, out.tokens) * out.response_mask
    # Same f32 tolerance as the single-model parity test.
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_config_rejects_bad_values_by_name(settings, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{"max_new_tokens": 4, "eos_id": 1, **settings})
