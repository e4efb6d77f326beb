"""Tests of the MA-RLHF step: macros of one token are exactly the token-level PPO step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.ma_rlhf import MARLHFConfig, make_ma_rlhf_step
from rlhf_jax.train.steps.ppo import PPOConfig, PPOModels, init_ppo_extra, make_ppo_step
from rlhf_jax.train.steps.rollout import PPOUpdateConfig

TINY = ModelConfig(
    architecture="llama",
    vocab_size=16,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=32,
    max_position_embeddings=16,
)
BATCH, PROMPT, NEW = 8, 3, 6


@pytest.fixture(scope="module")
def pieces():
    """Separate-critic PPO models, a PPO config exercising every loss term, and a state."""
    policy_graphdef, policy_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    critic_graphdef, critic_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(1)))
    _, reward_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    models = PPOModels(policy_graphdef, critic_graphdef, critic_graphdef, shared_critic=False)
    # SGD keeps the parameter update linear in the gradient, so float32 summation-order
    # differences stay at rounding level (Adam would amplify them on near-zero gradients).
    tx = optax.sgd(0.5)
    config = PPOConfig(
        sampling=SamplingConfig(max_new_tokens=NEW, eos_id=1),
        update=PPOUpdateConfig(
            epochs=2,
            num_minibatches=2,
            entropy_coef=0.01,
            kl_mode="loss",
            normalisation="sequence",
        ),
    )
    extra = init_ppo_extra(
        reference_params=jax.tree.map(lambda x: x * 0.9, policy_params),
        reward_params=reward_params,
        kl_coef=0.1,
    )
    state = TrainState.create(
        {"policy": policy_params, "value": critic_params}, tx, rng=0, extra=extra
    )
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 3, TINY.vocab_size),
        "attention_mask": jnp.ones((BATCH, PROMPT), jnp.int32).at[:2, 0].set(0),
    }
    return models, tx, config, state, prompts


def test_macro_size_one_equals_token_level_ppo(pieces):
    models, tx, config, state, prompts = pieces
    rng = jax.random.key(3)
    token_state, token_metrics = jax.jit(make_ppo_step(models, tx, config))(state, prompts, rng)
    macro_step = make_ma_rlhf_step(models, tx, MARLHFConfig(ppo=config, macro_size=1))
    macro_state, macro_metrics = jax.jit(macro_step)(state, prompts, rng)
    # Same key, same sampler: the same rollout. Every term (clipped surrogate, clipped
    # value loss, entropy, k3 KL, sequence normalisation, whitening) is then the same
    # float32 arithmetic summed in another order: agreement to 1e-6.
    for key in ("loss", "policy_loss", "reward_value_loss", "entropy_loss", "kl_loss"):
        np.testing.assert_allclose(macro_metrics[key], token_metrics[key], rtol=1e-6, atol=1e-6)
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), token_state.params, state.params)
    )
    assert max(float(m) for m in moved) > 1e-3  # the update did something
    for new, expected in zip(
        jax.tree.leaves(macro_state.params), jax.tree.leaves(token_state.params), strict=True
    ):
        np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6)
    assert float(macro_metrics["macros_per_response"]) == float(token_metrics["response_length"])


def test_config_rejects_an_empty_macro():
    with pytest.raises(ValueError, match="macro_size"):
        MARLHFConfig(
            ppo=PPOConfig(sampling=SamplingConfig(max_new_tokens=2, eos_id=1)), macro_size=0
        )
