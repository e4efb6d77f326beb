"""Tests of the Safe-RLHF step: the multiplier's dual ascent, in the step and on its own."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.objectives.safe_rlhf import safe_rlhf_advantages
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.rollout import PPOUpdateConfig
from rlhf_jax.train.steps.safe_rlhf import (
    SafeRLHFConfig,
    SafeRLHFModels,
    init_safe_rlhf_extra,
    make_safe_rlhf_step,
    multiplier_value,
    token_rewards_and_costs,
    updated_multiplier,
)

TINY = ModelConfig(
    architecture="llama",
    vocab_size=16,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=32,
    max_position_embeddings=16,
)
BATCH, PROMPT, NEW = 8, 3, 4
THRESHOLD, MULTIPLIER_LR = 0.0, 0.1
COST_OFFSET = 20.0  # added to / subtracted from the cost head's bias


def sampling():
    return SamplingConfig(max_new_tokens=NEW, eos_id=1)


@pytest.fixture(scope="module")
def setup():
    """One compiled Safe-RLHF step and its initial state."""
    policy_graphdef, policy_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    critic_graphdef, reward_critic = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(1)))
    _, cost_critic = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    scorer_graphdef, reward_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(3)))
    _, cost_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(4)))
    config = SafeRLHFConfig(
        sampling=sampling(),
        update=PPOUpdateConfig(epochs=1, whiten_advantages=False),
        cost_threshold=THRESHOLD,
        multiplier_lr=MULTIPLIER_LR,
    )
    tx = optax.adam(1e-3)
    models = SafeRLHFModels(policy_graphdef, critic_graphdef, scorer_graphdef, scorer_graphdef)
    params = {"policy": policy_params, "reward_value": reward_critic, "cost_value": cost_critic}
    step = jax.jit(make_safe_rlhf_step(models, tx, config))
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 2, 16),
        "attention_mask": jnp.ones((BATCH, PROMPT), jnp.int32),
    }

    def initial_state(cost_shift: float, multiplier: float):
        shifted = jax.tree.map(lambda x: x, cost_params)
        shifted["head"]["bias"] = nnx.Param(shifted["head"]["bias"][...] + cost_shift)
        extra = init_safe_rlhf_extra(
            config,
            reference_params=policy_params,
            reward_params=reward_params,
            cost_params=shifted,
            kl_coef=0.05,
            multiplier=multiplier,
        )
        return TrainState.create(params, tx, rng=0, extra=extra)

    return step, prompts, initial_state, config


def run(setup, cost_shift, multiplier, iterations):
    step, prompts, initial_state, config = setup
    state = initial_state(cost_shift, multiplier)
    history = []
    for i in range(iterations):
        before = float(multiplier_value(state.extra, config))
        state, metrics = step(state, prompts, jax.random.key(i))
        history.append((before, jax.device_get(metrics)))
    return history


def test_multiplier_rises_by_the_dual_step_when_cost_exceeds_threshold(setup):
    history = run(setup, +COST_OFFSET, multiplier=0.5, iterations=3)
    for before, metrics in history:
        assert metrics["cost_score"] > THRESHOLD
        expected = before + MULTIPLIER_LR * (metrics["cost_score"] - THRESHOLD)
        np.testing.assert_allclose(metrics["lambda"], expected, rtol=1e-6)
    assert history[-1][1]["lambda"] > history[0][0]


def test_multiplier_falls_and_is_clamped_at_zero_when_cost_is_below_threshold(setup):
    history = run(setup, -COST_OFFSET, multiplier=0.5, iterations=3)
    # Costs near -20 move λ by about -2 per step: it hits the clamp at once and stays.
    assert all(metrics["cost_score"] < THRESHOLD for _, metrics in history)
    assert [float(metrics["lambda"]) for _, metrics in history] == [0.0, 0.0, 0.0]


def test_multiplier_update_direct_and_log_parameterised():
    direct = SafeRLHFConfig(sampling=sampling(), cost_threshold=1.0, multiplier_lr=0.5)
    up = updated_multiplier(jnp.float32(0.2), jnp.float32(3.0), direct)
    np.testing.assert_allclose(float(up), 0.2 + 0.5 * 2.0, rtol=1e-6)
    assert float(updated_multiplier(jnp.float32(0.2), jnp.float32(0.0), direct)) == 0.0
    logged = SafeRLHFConfig(
        sampling=sampling(), cost_threshold=1.0, multiplier_lr=0.5, log_multiplier=True
    )
    log_lambda = jnp.float32(math.log(0.2))
    # ln λ ← ln λ + α λ (J_C − d) (Dai et al., 2023, eq. 31), hand-computed.
    up = updated_multiplier(log_lambda, jnp.float32(3.0), logged)
    np.testing.assert_allclose(float(up), math.log(0.2) + 0.5 * 0.2 * 2.0, rtol=1e-6)
    down = updated_multiplier(log_lambda, jnp.float32(0.0), logged)
    assert float(down) < math.log(0.2)
    extra = init_safe_rlhf_extra(
        logged,
        reference_params={},
        reward_params={},
        cost_params={},
        kl_coef=0.1,
        multiplier=0.2,
    )
    np.testing.assert_allclose(float(multiplier_value(extra, logged)), 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="λ₀ > 0"):
        init_safe_rlhf_extra(
            logged,
            reference_params={},
            reward_params={},
            cost_params={},
            kl_coef=0.1,
            multiplier=0.0,
        )


def test_kl_penalty_keeps_weight_beta_in_the_combined_reward_whatever_lambda():
    logp = jnp.array([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.7, 0.0]])
    ref = jnp.array([[0.0, -1.5, -1.0, -0.5], [0.0, -0.1, -0.2, 0.0]])
    mask = jnp.array([[0, 1, 1, 1], [0, 1, 1, 0]], jnp.float32)
    rewards, costs, beta = jnp.array([3.0, -2.0]), jnp.array([1.0, 4.0]), 0.1
    per_token = token_rewards_and_costs(
        rewards, costs, logp, ref, mask, beta, PPOUpdateConfig(kl_estimator="k1")
    )
    k1 = np.asarray((logp - ref) * mask)
    last = np.zeros((2, 4), bool)
    last[0, 3], last[1, 2] = True, True
    for lam in (0.0, 0.5, 4.0):
        combined = np.asarray(
            safe_rlhf_advantages(per_token["reward"], per_token["cost"], jnp.float32(lam))
        )
        # (r_t − λ c_t)/(1 + λ) = −β k_t + 1[t = T] (R − λ C)/(1 + λ), by hand.
        scores = (np.asarray(rewards) - lam * np.asarray(costs)) / (1.0 + lam)
        expected = -beta * k1 + np.where(last, scores[:, None], 0.0)
        np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-6)
