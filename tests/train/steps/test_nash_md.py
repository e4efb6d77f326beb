"""Tests of the Nash-MD steps: mixture sampling, preferences, oracle and reward-model labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.nash_md import (
    NashMDConfig,
    NashMDModels,
    ResponsePairs,
    init_nash_md_extra,
    make_nash_md_step,
    mixture_sample,
    oracle_preferences,
    reward_model_preferences,
)
from rlhf_jax.train.steps.rollout import generate

TINY = ModelConfig(
    architecture="llama",
    vocab_size=16,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=32,
    max_position_embeddings=16,
)
BATCH, PROMPT, NEW = 16, 3, 5
SAMPLING = SamplingConfig(max_new_tokens=NEW, eos_id=1)


@pytest.fixture(scope="module")
def models():
    policy_graphdef, policy_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    _, reference_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(5)))
    reward_graphdef, reward_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 2, 16),
        "attention_mask": jnp.ones((BATCH, PROMPT), jnp.int32).at[:4, 0].set(0),
    }
    return {
        "models": NashMDModels(policy_graphdef, reward_graphdef),
        "policy": policy_params,
        "reference": reference_params,
        "reward": reward_params,
        "prompts": prompts,
    }


@pytest.fixture(scope="module")
def policy_and_mixture(models):
    """Samples from the policy and from the β = 0 mixture with one key."""
    key = jax.random.key(3)
    graphdef = models["models"].policy
    mixture = mixture_sample(
        graphdef,
        models["policy"],
        models["reference"],  # a different model: β = 0 must ignore it
        models["prompts"],
        key,
        beta=0.0,
        sampling=SAMPLING,
    )
    policy = generate(graphdef, models["policy"], models["prompts"], key, sampling=SAMPLING)
    return policy, mixture


def test_mixture_with_beta_zero_samples_from_the_policy_alone(policy_and_mixture):
    policy, mixture = policy_and_mixture
    np.testing.assert_array_equal(mixture.tokens, policy.tokens)
    np.testing.assert_array_equal(mixture.response_mask, policy.response_mask)
    # log_softmax(1·log π + 0·log μ) = log π up to float32 rounding.
    np.testing.assert_allclose(mixture.logprobs, policy.logprobs, atol=1e-5)


def other_pairs(models):
    """A pair batch whose two sides differ: the policy's and the reference's samples."""
    graphdef, key = models["models"].policy, jax.random.key(4)
    first = generate(graphdef, models["policy"], models["prompts"], key, sampling=SAMPLING)
    second = generate(graphdef, models["reference"], models["prompts"], key, sampling=SAMPLING)
    return ResponsePairs(first=first, second=second)


def test_reward_model_preference_is_sigmoid_of_score_difference(models):
    pairs = other_pairs(models)
    preferences = np.asarray(
        reward_model_preferences(models["models"].reward, models["reward"], pairs)
    )
    # Independent scores: the reward model's per-token scalars, read in numpy at the
    # last column whose attention mask is set.
    scorer = nnx.merge(models["models"].reward, models["reward"])

    def scores(output):
        scalars = np.asarray(scorer(output.tokens, attention_mask=output.attention_mask))
        mask = np.asarray(output.attention_mask)
        last = np.array([np.nonzero(row)[0][-1] for row in mask])
        return scalars[np.arange(BATCH), last]

    expected = 1.0 / (1.0 + np.exp(-(scores(pairs.first) - scores(pairs.second))))
    # Same float32 forward pass on both sides: agreement to 1e-6.
    np.testing.assert_allclose(preferences, expected, atol=1e-6)
    assert np.ptp(preferences) > 0.0  # the two sides really differ


def test_host_oracle_labels_decoded_text(models):
    pairs = other_pairs(models)
    texts = [f"prompt {i}" for i in range(BATCH)]
    calls = []

    def oracle(prompt, first, second):
        calls.append(prompt)
        return 1.0 if len(first.split()) > len(second.split()) else 0.0

    decode = lambda ids: " ".join(str(i) for i in ids)  # noqa: E731
    preferences = oracle_preferences(pairs, texts, decode, oracle)
    assert calls == texts
    first_lengths = np.asarray(pairs.first.response_mask).sum(1)
    second_lengths = np.asarray(pairs.second.response_mask).sum(1)
    # The decoded text is one word per response token (EOS included).
    np.testing.assert_array_equal(preferences, (first_lengths > second_lengths).astype(np.float32))
    with pytest.raises(ValueError, match="prompt texts"):
        oracle_preferences(pairs, texts[:3], decode, oracle)


@pytest.fixture(scope="module")
def nash_run(models):
    """Nash-MD-PG with reward-model preferences: the fused step, jitted once."""
    config = NashMDConfig(sampling=SAMPLING, loss="nash_md", mixture_beta=0.25, tau=0.01)
    tx = optax.adam(3e-2)
    extra = init_nash_md_extra(reference_params=models["policy"], reward_params=models["reward"])
    state = TrainState.create(models["policy"], tx, rng=0, extra=extra)
    traces = []
    step = make_nash_md_step(models["models"], tx, config)

    def counted(state, batch, rng):
        traces.append(1)
        return step(state, batch, rng)

    jitted = jax.jit(counted)
    history = []
    for i in range(20):
        state, metrics = jitted(state, models["prompts"], jax.random.key(i))
        history.append(jax.device_get(metrics))
    return {"history": history, "traces": len(traces)}


def test_nash_md_step_compiles_once_and_raises_the_reward_model_score(nash_run):
    assert nash_run["traces"] == 1
    scores = [m["reward_score"] for m in nash_run["history"]]
    # A mean over 16 samples; a rise of 0.3 is several standard errors of it.
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3, scores
    assert not any(bool(m["nonfinite"]) for m in nash_run["history"])


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"NashMDConfig\.loss"):
        NashMDConfig(sampling=SAMPLING, loss="dpo")
    with pytest.raises(ValueError, match=r"NashMDConfig\.mixture_beta"):
        NashMDConfig(sampling=SAMPLING, mixture_beta=1.5)
