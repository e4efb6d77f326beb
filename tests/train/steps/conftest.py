"""Shared fixtures of the step tests: a policy moved far from its initial parameters."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.steps.rollout import generate, sequence_scores

TINY = ModelConfig(
    architecture="llama",
    vocab_size=16,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=32,
    max_position_embeddings=16,
)
PROMPTS, SAMPLES_PER_PROMPT, PROMPT, NEW = 4, 2, 3, 5


@pytest.fixture(scope="module")
def moved_policy():
    """A tiny policy's initial parameters and a copy moved by unit noise on every weight.

    A fresh initialisation's logits are nearly uniform, so two fresh policies would draw
    the same replies from one key; the noise makes the two policies sample differently.
    Also a reward model, a second decoder (a reference), prompts and sampling settings.
    """
    graphdef, initial = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(initial)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = jax.tree.unflatten(
        treedef,
        [x + jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)],
    )
    reward_graphdef, reward = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    _, reference = nnx.split(Decoder(TINY, rngs=nnx.Rngs(4)))
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (PROMPTS, PROMPT), 2, 16),
        "attention_mask": jnp.ones((PROMPTS, PROMPT), jnp.int32).at[:2, 0].set(0),
    }
    return types.SimpleNamespace(
        graphdef=graphdef,
        initial=initial,
        moved=moved,
        reward_graphdef=reward_graphdef,
        reward=reward,
        reference=reference,
        prompts=prompts,
        num_samples=SAMPLES_PER_PROMPT,
        sampling=SamplingConfig(max_new_tokens=NEW, eos_id=1),
    )


def replies_of(policy, params, sample_key):
    """The replies ``params`` draw for the repeated prompts with ``sample_key``, and their
    mean reward."""
    repeated = {k: jnp.repeat(v, policy.num_samples, axis=0) for k, v in policy.prompts.items()}
    output = generate(policy.graphdef, params, repeated, sample_key, sampling=policy.sampling)
    rewards = sequence_scores(
        policy.reward_graphdef, policy.reward, output.tokens, output.attention_mask
    )
    return output, float(jnp.mean(rewards))


@pytest.fixture(scope="module")
def assert_trains_on_replies_of():
    """``check(metrics, policy, sample_key, online)``: the step's metrics are those of the
    replies of the current (moved) policy when online, of the initial one when offline."""

    def check(metrics, policy, sample_key, online):
        initial, initial_reward = replies_of(policy, policy.initial, sample_key)
        current, current_reward = replies_of(policy, policy.moved, sample_key)
        # The two policies draw different replies with the same key, so the check can tell
        # them apart; the step's mean reward is that of one of them up to float32
        # rounding (1e-5).
        assert not np.array_equal(initial.tokens, current.tokens)
        assert abs(initial_reward - current_reward) > 1e-3
        expected, reward = (current, current_reward) if online else (initial, initial_reward)
        np.testing.assert_allclose(metrics["reward_score"], reward, rtol=1e-5)
        np.testing.assert_allclose(
            metrics["response_length"], jnp.mean(jnp.sum(expected.response_mask, -1)), rtol=1e-6
        )

    return check
