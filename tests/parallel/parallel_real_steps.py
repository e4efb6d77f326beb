"""The project's real training steps on a tiny Llama decoder, for the sharded-step tests.

Shared by tests/parallel/test_steps.py and the two-process worker (which runs outside
pytest). Every width the default rules shard divides by 8 (vocabulary 64, width 32,
8 query and 8 key/value heads, MLP 64), so FSDP and tensor parallelism really split the
weights on an 8-device mesh. Batches have 8 rows: one per device when the batch axes span
all 8 devices.

The optimiser is plain SGD (optax.sgd): the parameter change is lr times the gradient,
so a sharded step that equals the single-device step to f32 reduction-order noise in the
gradient gives parameters equal to about lr * 1e-7 * |g|. With Adam, a near-zero gradient
component whose sign flips under that noise would move its parameter by 2 lr after the
first step (m / sqrt(v) = sign(g)), making any tolerance below 2 lr dishonest.
"""

import functools
import math

import jax
import numpy as np
import optax
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, PolicyWithValueHead, ScalarModel
from rlhf_jax.parallel.mesh import make_mesh
from rlhf_jax.parallel.steps import shard_step
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_dpo_step, make_reward_step, make_sft_step
from rlhf_jax.train.steps.dpo import initial_dpo_extra
from rlhf_jax.train.steps.nash_md import (
    NashMDConfig,
    NashMDModels,
    init_nash_md_extra,
    make_nash_md_step,
)
from rlhf_jax.train.steps.ppo import PPOConfig, PPOModels, init_ppo_extra, make_ppo_step
from rlhf_jax.train.steps.rollout import PPOUpdateConfig
from rlhf_jax.train.steps.safe_rlhf import (
    SafeRLHFConfig,
    SafeRLHFModels,
    init_safe_rlhf_extra,
    make_safe_rlhf_step,
)

CONFIG = ModelConfig.llama(
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=8,
    num_kv_heads=8,
    head_dim=4,
    mlp_hidden_size=64,
    max_position_embeddings=16,
)
BATCH, LENGTH, PROMPT, NEW = 8, 16, 4, 4
EOS = 1
# Random (not greedy) decoding: with partitionable threefry keys the draws do not depend
# on the mesh, and the sampled tokens are asserted equal across meshes.
SAMPLING = SamplingConfig(max_new_tokens=NEW, eos_id=EOS)
KINDS = ("sft", "reward", "dpo", "ppo", "nash_md", "safe_rlhf")
# SGD learning rates giving largest parameter changes of about 0.1 to 0.5 in one step
# (tests/parallel/test_steps.py checks that they exceed 1e-3).
LEARNING_RATE = {
    "sft": 1.0,
    "reward": 0.1,
    "dpo": 1.0,
    "ppo": 0.1,
    "nash_md": 1.0,
    "safe_rlhf": 0.2,
}


def decoder(seed):
    return nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(seed)))


def scalar_model(seed):
    return nnx.split(ScalarModel(CONFIG, rngs=nnx.Rngs(seed)))


def _padded_rows(rng, lengths):
    tokens = rng.integers(2, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return tokens * mask, mask


def sft_batch(seed=0):
    """Right-padded rows; the loss covers every real token after a 4-token prompt."""
    rng = np.random.default_rng(seed)
    tokens, mask = _padded_rows(rng, rng.integers(8, LENGTH + 1, BATCH))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    loss_mask = mask * (np.arange(LENGTH)[None] >= PROMPT)
    return {
        "input_ids": tokens,
        "attention_mask": mask,
        "positions": positions,
        "loss_mask": loss_mask.astype(np.int32),
    }


def pair_batch(seed=0):
    """Chosen and rejected rows sharing a prompt of 4 tokens, with response masks."""
    rng = np.random.default_rng(seed)
    batch = {}
    prompt = rng.integers(2, CONFIG.vocab_size, (BATCH, PROMPT))
    for side in ("chosen", "rejected"):
        tokens, mask = _padded_rows(rng, rng.integers(PROMPT + 2, LENGTH + 1, BATCH))
        tokens[:, :PROMPT] = prompt
        batch[f"{side}_input_ids"] = tokens
        batch[f"{side}_attention_mask"] = mask
        batch[f"{side}_response_mask"] = mask * (np.arange(LENGTH)[None] >= PROMPT)
    return batch


def prompt_batch(seed=0):
    """Left-padded prompts of up to 4 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, CONFIG.vocab_size, (BATCH, PROMPT)).astype(np.int32)
    mask = np.ones((BATCH, PROMPT), np.int32)
    mask[: BATCH // 2, : rng.integers(1, PROMPT)] = 0
    return {"input_ids": tokens * mask, "attention_mask": mask}


def make_tx(kind):
    return optax.sgd(LEARNING_RATE[kind])


def build(kind):
    """(step_fn, initial state, batch) of one step kind, on the default device."""
    tx = make_tx(kind)
    graphdef, policy = decoder(0)
    _, reference = decoder(1)
    if kind == "sft":
        return make_sft_step(graphdef, tx), TrainState.create(policy, tx, 0), sft_batch()
    if kind == "reward":
        scorer_graphdef, scorer = scalar_model(2)
        state = TrainState.create(scorer, tx, 0)
        return make_reward_step(scorer_graphdef, tx), state, pair_batch()
    if kind == "dpo":
        extra = initial_dpo_extra("dpo", reference="in_step", reference_params=reference)
        step = make_dpo_step(graphdef, tx, hyper={"beta": 0.5})
        return step, TrainState.create(policy, tx, 0, extra), pair_batch()
    reward_graphdef, reward = scalar_model(3)
    if kind == "ppo":
        critic_graphdef, actor_critic = nnx.split(
            PolicyWithValueHead(CONFIG, rngs=nnx.Rngs(4), policy=Decoder(CONFIG, rngs=nnx.Rngs(0)))
        )
        models = PPOModels(graphdef, critic_graphdef, reward_graphdef, shared_critic=True)
        config = PPOConfig(
            sampling=SAMPLING,
            update=PPOUpdateConfig(epochs=1, num_minibatches=2),
            kl_target=0.5,
            kl_horizon=64.0,
        )
        extra = init_ppo_extra(reference_params=reference, reward_params=reward, kl_coef=0.1)
        state = TrainState.create(actor_critic, tx, 0, extra)
        return make_ppo_step(models, tx, config), state, prompt_batch()
    if kind == "nash_md":
        config = NashMDConfig(sampling=SAMPLING, loss="nash_md", mixture_beta=0.25, tau=0.1)
        extra = init_nash_md_extra(reference_params=reference, reward_params=reward)
        step = make_nash_md_step(NashMDModels(graphdef, reward_graphdef), tx, config)
        return step, TrainState.create(policy, tx, 0, extra), prompt_batch()
    if kind == "safe_rlhf":
        critic_graphdef, reward_critic = scalar_model(5)
        _, cost_critic = scalar_model(6)
        _, cost = scalar_model(7)
        config = SafeRLHFConfig(
            sampling=SAMPLING,
            update=PPOUpdateConfig(epochs=1, whiten_advantages=False),
            multiplier_lr=0.1,
        )
        models = SafeRLHFModels(graphdef, critic_graphdef, reward_graphdef, reward_graphdef)
        extra = init_safe_rlhf_extra(
            config,
            reference_params=reference,
            reward_params=reward,
            cost_params=cost,
            kl_coef=0.1,
            multiplier=1.0,
        )
        params = {"policy": policy, "reward_value": reward_critic, "cost_value": cost_critic}
        return (
            make_safe_rlhf_step(models, tx, config),
            TrainState.create(params, tx, 0, extra),
            (prompt_batch()),
        )
    raise ValueError(kind)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def mesh_of(mesh_shape):
    return make_mesh(mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])


# XLA's LLVM optimisation level changes neither the partitioning nor the f32 operations
# the comparison is about; level 0 roughly halves the compile time of these programs.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def step_key(index):
    """The raw uint32 key of step ``index`` (the loop's keys are raw too), on the host."""
    return np.asarray(jax.random.key_data(jax.random.key(100 + index)))


class CompiledStep:
    """One step kind compiled on one mesh, with its host initial state and batch."""

    def __init__(self, kind, mesh, build_fn=None):
        step_fn, state, batch = (build_fn or build)(kind)
        self.sharded = shard_step(step_fn, mesh, state, batch, tx=make_tx(kind))
        self.initial = host(state)  # host copies: the donating step never frees them
        self.batch = batch
        placed = self.initial_state()
        self.compiled = self.sharded.step.lower(
            placed, self.place_batch(batch), step_key(0)
        ).compile(FAST_COMPILE)

    def initial_state(self):
        return self.sharded.place_state(self.initial)

    def place_batch(self, batch):
        return self.sharded.place_batch(batch)

    def __call__(self, state, batch, rng):
        """One step on a placed state and a host batch (placed per process here)."""
        return self.compiled(state, self.place_batch(batch), rng)


@functools.cache
def compiled_step(kind, mesh_shape):
    """The CompiledStep of ``kind`` on a sub-mesh of this process's devices, built once."""
    return CompiledStep(kind, mesh_of(mesh_shape))
