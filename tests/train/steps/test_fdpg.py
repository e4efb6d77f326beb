"""f-DPG step: offline samples from the initial policy, online from the current one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.fdpg import FDPGConfig, init_fdpg_extra, make_fdpg_step
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
PROMPTS, N, PROMPT, NEW = 4, 2, 3, 5
SAMPLING = SamplingConfig(max_new_tokens=NEW, eos_id=1)
TX = optax.adam(1e-2)
RNG = jax.random.key(11)


@pytest.fixture(scope="module")
def setup():
    """A state whose policy has moved far from the initial one (unit noise on every weight:
    a fresh initialisation's logits are nearly uniform, and two such policies would draw
    the same replies from one key)."""
    graphdef, initial = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(initial)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = jax.tree.unflatten(
        treedef,
        [x + jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)],
    )
    reward_graphdef, reward = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (PROMPTS, PROMPT), 2, 16),
        "attention_mask": jnp.ones((PROMPTS, PROMPT), jnp.int32).at[:2, 0].set(0),
    }
    _, reference = nnx.split(Decoder(TINY, rngs=nnx.Rngs(4)))
    extra = init_fdpg_extra(
        reference_params=reference, reward_params=reward, initial_params=initial
    )
    state = TrainState.create(moved, TX, rng=0, extra=extra)
    return graphdef, reward_graphdef, state, prompts


def sampled_by(graphdef, reward_graphdef, params, state, prompts):
    """The replies (and their mean reward) the step would draw from ``params``: the step
    samples n replies per repeated prompt with its key as it is."""
    repeated = {k: jnp.repeat(v, N, axis=0) for k, v in prompts.items()}
    output = generate(graphdef, params, repeated, RNG, sampling=SAMPLING)
    rewards = sequence_scores(
        reward_graphdef, state.extra["reward_params"], output.tokens, output.attention_mask
    )
    return output, float(jnp.mean(rewards))


@pytest.fixture(scope="module")
def replies(setup):
    """What the initial and the current policy draw with the step's key, and mean rewards."""
    graphdef, reward_graphdef, state, prompts = setup
    return {
        name: sampled_by(graphdef, reward_graphdef, params, state, prompts)
        for name, params in (("initial", state.extra["initial_params"]), ("current", state.params))
    }


@pytest.mark.parametrize("online", [False, True])
def test_fdpg_samples_from_the_initial_policy_offline_and_the_current_one_online(
    setup, replies, online
):
    graphdef, reward_graphdef, state, prompts = setup
    config = FDPGConfig(sampling=SAMPLING, num_samples=N, online=online)
    step = jax.jit(make_fdpg_step(graphdef, reward_graphdef, TX, config))
    _, metrics = step(state, prompts, RNG)
    (initial, initial_reward), (current, current_reward) = replies["initial"], replies["current"]
    # The two policies draw different replies with the same key, so the test can tell them
    # apart; the step's mean reward is that of one of them up to float32 rounding (1e-5).
    assert not np.array_equal(initial.tokens, current.tokens)
    assert abs(initial_reward - current_reward) > 1e-3
    expected, expected_reward = (current, current_reward) if online else (initial, initial_reward)
    np.testing.assert_allclose(metrics["reward_score"], expected_reward, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["response_length"], jnp.mean(jnp.sum(expected.response_mask, -1)), rtol=1e-6
    )
