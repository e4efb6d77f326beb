"""Tests of the PPO step on a tiny decoder: reward placement, compilation, learning, KL control."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, PolicyWithValueHead, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.ppo import (
    PPOConfig,
    PPOModels,
    actor_critic_forward,
    advantage_data,
    finish_iteration,
    init_ppo_extra,
    make_ppo_step,
    sample_rollout,
    single_pass_update,
    token_rewards,
)
from rlhf_jax.train.steps.rollout import PPOUpdateConfig, actor_critic_sum_loss, ppo_epochs

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
ITERATIONS = 16
KL_TARGET, KL_HORIZON = 0.5, 64.0


def prompts():
    tokens = jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 2, TINY.vocab_size)
    mask = jnp.ones((BATCH, PROMPT), jnp.int32).at[: BATCH // 2, 0].set(0)  # some left pads
    return {"input_ids": tokens, "attention_mask": mask}


@pytest.fixture(scope="module")
def trajectory():
    """A shared-critic PPO run on a fixed prompt batch: metrics per iteration, trace count."""
    policy_graphdef, policy_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    critic_graphdef, params = nnx.split(
        PolicyWithValueHead(TINY, rngs=nnx.Rngs(1), policy=Decoder(TINY, rngs=nnx.Rngs(0)))
    )
    reward_graphdef, reward_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    models = PPOModels(policy_graphdef, critic_graphdef, reward_graphdef, shared_critic=True)
    tx = optax.adam(1e-2)
    config = PPOConfig(
        sampling=SamplingConfig(max_new_tokens=NEW, eos_id=1),
        update=PPOUpdateConfig(epochs=2, num_minibatches=2, kl_estimator="k1"),
        kl_target=KL_TARGET,
        kl_horizon=KL_HORIZON,
    )
    extra = init_ppo_extra(
        reference_params=policy_params, reward_params=reward_params, kl_coef=0.05
    )
    state = TrainState.create(params, tx, rng=0, extra=extra)
    traces = []
    step = make_ppo_step(models, tx, config)

    def counted(state, batch, rng):
        traces.append(1)
        return step(state, batch, rng)

    jitted = jax.jit(counted)
    batch, history = prompts(), []
    for i in range(ITERATIONS):
        state, metrics = jitted(state, batch, jax.random.key(i))
        history.append(jax.device_get(metrics))
    return {"history": history, "traces": len(traces), "state": state}


def test_kl_in_reward_places_score_on_last_token_and_penalty_on_every_token():
    logp = jnp.array([[0.0, -1.0, -2.0, -0.5, 0.0], [0.0, 0.0, -0.3, -0.7, 0.0]])
    ref = jnp.array([[0.0, -1.5, -1.0, -0.5, 0.0], [0.0, 0.0, -0.1, -0.2, 0.0]])
    mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], jnp.float32)
    scores, beta = jnp.array([3.0, -2.0]), 0.1
    rewards = np.asarray(
        token_rewards(scores, logp, ref, mask, beta, PPOUpdateConfig(kl_mode="reward"))
    )
    # Hand-built: r_t = -β (logp - ref) on response tokens, + score on the last one.
    expected = -beta * np.asarray(logp - ref) * np.asarray(mask)
    expected[0, 3] += 3.0
    expected[1, 3] += -2.0
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    in_loss = np.asarray(
        token_rewards(scores, logp, ref, mask, beta, PPOUpdateConfig(kl_mode="loss"))
    )
    only_scores = np.zeros_like(expected)
    only_scores[0, 3], only_scores[1, 3] = 3.0, -2.0
    np.testing.assert_array_equal(in_loss, only_scores)


def test_ppo_iteration_compiles_once(trajectory):
    assert trajectory["traces"] == 1


def test_ppo_raises_the_reward_model_score(trajectory):
    scores = [m["reward_score"] for m in trajectory["history"]]
    # Each score is a mean over 16 samples of a reward model whose scores spread about
    # ±1; a rise of 0.3 between the first and the last three iterations is several
    # standard errors (the run is seeded, so this is deterministic).
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3, scores


def test_value_loss_decreases(trajectory):
    losses = [m["reward_value_loss"] for m in trajectory["history"]]
    # The returns move with the policy, so the loss is not monotone; the critic still
    # has to fit them: the last three iterations' loss is well below the first three's
    # (measured ratio about 0.6 on this seeded run).
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses


def test_adaptive_kl_controller_follows_ziegler_update(trajectory):
    history = trajectory["history"]
    for before, after in itertools.pairwise(history):
        error = np.clip(before["kl"] / KL_TARGET - 1.0, -0.2, 0.2)
        expected = before["kl_coef"] * (1.0 + error * BATCH / KL_HORIZON)
        np.testing.assert_allclose(after["kl_coef"], expected, rtol=1e-6)
    assert history[-1]["kl_coef"] != history[0]["kl_coef"]


def test_first_rollout_has_zero_kl_to_an_identical_reference(trajectory):
    # The first rollout comes from π = π_ref (same parameters): the policy's and the
    # reference's per-token log-probs are computed on the same alignment, so KL is 0.
    assert abs(trajectory["history"][0]["kl"]) < 1e-5
    assert trajectory["history"][-1]["kl"] > 0.0


@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
def test_single_pass_update_equals_the_rollout_forward_then_ppo_epochs(kl_mode):
    # One epoch of one minibatch: the step takes π_old and V_old from the update's own
    # forward pass. It must equal the general path composed from the public pieces (a
    # separate π_old/value forward, then ppo_epochs). Same float32 maths in a different
    # fusion/summation order, so 1e-5 relative on metrics and 1e-6 absolute on parameters
    # (Adam's first step moves each parameter by ~lr = 1e-2, far above that).
    policy_graphdef, policy_params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    critic_graphdef, params = nnx.split(
        PolicyWithValueHead(TINY, rngs=nnx.Rngs(1), policy=Decoder(TINY, rngs=nnx.Rngs(3)))
    )
    reward_graphdef, reward_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(2)))
    models = PPOModels(policy_graphdef, critic_graphdef, reward_graphdef, shared_critic=True)
    tx = optax.adam(1e-2)
    config = PPOConfig(
        sampling=SamplingConfig(max_new_tokens=NEW, eos_id=1),
        update=PPOUpdateConfig(epochs=1, num_minibatches=1, kl_mode=kl_mode, entropy_coef=0.01),
    )
    extra = init_ppo_extra(reference_params=policy_params, reward_params=reward_params, kl_coef=0.1)
    state = TrainState.create(params, tx, rng=0, extra=extra)
    rng = jax.random.key(7)

    def general_path(state, batch, rng):
        sample_key, update_key = jax.random.split(rng)
        forward = actor_critic_forward(models)
        rollout = sample_rollout(
            models, forward, state, batch, sample_key, sampling=config.sampling
        )
        kl_coef = state.extra["kl_coef"]
        rewards, data = advantage_data(rollout, kl_coef, config.update)
        loss_fn = actor_critic_sum_loss(forward, ("reward",), config.update, kl_coef)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=config.update)
        return finish_iteration(state, metrics, rollout, rewards, config)

    fused_state, fused = jax.jit(make_ppo_step(models, tx, config))(state, prompts(), rng)
    general_state, general = jax.jit(general_path)(state, prompts(), rng)
    assert set(fused) == set(general)
    for name in general:
        np.testing.assert_allclose(fused[name], general[name], rtol=1e-5, atol=1e-6, err_msg=name)
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, fused_state.params
    )
    assert max(jax.tree.leaves(moved)) > 1e-3
    leaves = zip(
        jax.tree.leaves(fused_state.params), jax.tree.leaves(general_state.params), strict=True
    )
    for a, b in leaves:
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_single_pass_update_refuses_an_update_of_several_passes():
    update = PPOUpdateConfig(epochs=2, num_minibatches=1)
    with pytest.raises(ValueError, match="epochs = num_minibatches"):
        single_pass_update(None, optax.sgd(1.0), None, None, None, None, update)
