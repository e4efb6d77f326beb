"""RAFT step: offline samples from the initial policy, online from the current one."""

import jax
import optax
import pytest

from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.raft import RAFTConfig, init_raft_extra, make_raft_step

TX = optax.adam(1e-2)
RNG = jax.random.key(11)


@pytest.mark.parametrize("online", [False, True])
def test_raft_samples_from_the_initial_policy_offline_and_the_current_one_online(
    moved_policy, assert_trains_on_replies_of, online
):
    policy = moved_policy
    extra = init_raft_extra(reward_params=policy.reward, initial_params=policy.initial)
    state = TrainState.create(policy.moved, TX, rng=0, extra=extra)
    config = RAFTConfig(sampling=policy.sampling, num_samples=policy.num_samples, online=online)
    step = jax.jit(make_raft_step(policy.graphdef, policy.reward_graphdef, TX, config))
    _, metrics = step(state, policy.prompts, RNG)
    sample_key, _ = jax.random.split(RNG)  # the step splits its key into (sampling, loss)
    assert_trains_on_replies_of(metrics, policy, sample_key, online)
