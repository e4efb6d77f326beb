"""Tests of the CGPO step: judges on token arrays, and CRPG / CRRAFT / CODPO updates on a rollout.

The updates are checked against an independent implementation: the gradient of a
weighted sum of the policy's token log-probs (``models.logprobs.sequence_logprobs``),
with the weights of the paper's update written out by hand, applied by SGD.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.cgpo import (
    CGPOConfig,
    CGPOModels,
    JudgeConfig,
    banned_sequence_violation,
    judge_violations,
    make_cgpo_update,
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
PROMPTS, SAMPLES, LENGTH, RESPONSE = 4, 3, 8, 5
LEARNING_RATE = 0.5
CODPO_BETA = 0.5


def test_banned_sequences_match_only_whole_runs_inside_the_response():
    tokens = jnp.array(
        [
            [7, 8, 9, 3, 4, 5],  # 3 4 5 inside the response
            [7, 3, 4, 9, 4, 5],  # 3 4 then 9: no full match
            [3, 4, 5, 9, 9, 9],  # 3 4 5 starts in the prompt (masked)
            [9, 9, 9, 9, 9, 6],  # the single banned token 6
        ]
    )
    mask = jnp.array([[0, 1, 1, 1, 1, 1]] * 2 + [[0, 0, 1, 1, 1, 1]] + [[0, 1, 1, 1, 1, 1]])
    flags = banned_sequence_violation(tokens, mask, sequences=((3, 4, 5), (6,)))
    np.testing.assert_array_equal(flags, [True, False, False, True])
    assert not bool(jnp.any(banned_sequence_violation(tokens, mask, sequences=())))


def test_mixture_flags_a_sample_when_any_judge_does():
    tokens = jnp.array([[5, 5, 5, 5], [5, 2, 6, 6], [5, 5, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    costs = jnp.array([-1.0, -1.0, 2.0])
    judges = JudgeConfig(max_tokens=3, banned_sequences=((2, 6),), cost_threshold=0.5)
    flags = judge_violations(judges, tokens, mask, costs)
    np.testing.assert_array_equal(flags["length"], [True, True, False])
    np.testing.assert_array_equal(flags["banned"], [False, True, False])
    np.testing.assert_array_equal(flags["cost"], [False, False, True])
    np.testing.assert_array_equal(flags["any"], [True, True, True])
    assert set(judge_violations(JudgeConfig(), tokens, mask, None)) == {"any"}


@pytest.fixture(scope="module")
def setup():
    """A policy, a fixed rollout of P prompts × n samples, and a jitted reference gradient."""
    graphdef, params = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    keys = jax.random.split(jax.random.key(1), 4)
    shape = (PROMPTS, SAMPLES, LENGTH)
    response = jnp.zeros(shape).at[..., LENGTH - RESPONSE :].set(1.0)
    data = {
        "tokens": jax.random.randint(keys[0], shape, 3, TINY.vocab_size),
        "attention_mask": jnp.ones(shape, jnp.int32),
        "response_mask": response,
        "ref_logprobs": 0.5 * jax.random.normal(keys[3], shape) * response,
        "rewards": jax.random.normal(keys[1], shape[:2]),
        "calibrated_rewards": jax.random.uniform(keys[2], shape[:2], minval=0.05, maxval=0.95),
        "violations": jnp.zeros(shape[:2], bool),
    }

    @jax.jit
    def reference_update(params, weights):
        # One SGD step on −Σ_i w_i log π(a_i|s_i): the update written from the paper.
        def loss(params):
            flat = {k: data[k].reshape(-1, LENGTH) for k in ("tokens", "attention_mask")}
            model = nnx.merge(graphdef, params)
            _, logps = sequence_logprobs(
                model, flat["tokens"], flat["attention_mask"], response.reshape(-1, LENGTH)
            )
            return -jnp.sum(weights.reshape(-1) * logps)

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

    @jax.jit
    def reference_codpo_update(params, chosen, rejected, valid):
        # One SGD step on the CODPO loss written out: per prompt with a feasible sample,
        # −log σ(β (Δ_chosen − Δ_rejected)) − λ log π(a⁺)/|a⁺|, Δ = log π − log π_ref.
        def loss(params):
            flat = {k: data[k].reshape(-1, LENGTH) for k in ("tokens", "attention_mask")}
            model = nnx.merge(graphdef, params)
            _, logps = sequence_logprobs(
                model, flat["tokens"], flat["attention_mask"], response.reshape(-1, LENGTH)
            )
            ratios = logps.reshape(PROMPTS, SAMPLES) - data["ref_logprobs"].sum(-1)
            rows = jnp.arange(PROMPTS)
            margin = ratios[rows, chosen] - ratios[rows, rejected]
            nll = -logps.reshape(PROMPTS, SAMPLES)[rows, chosen] / RESPONSE
            per_pair = -jax.nn.log_sigmoid(CODPO_BETA * margin) + nll
            return jnp.sum(valid * per_pair) / jnp.sum(valid)

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

    tx = optax.sgd(LEARNING_RATE)
    state = TrainState.create({"policy": params}, tx, rng=0)
    models = CGPOModels(graphdef, graphdef)
    sampling = SamplingConfig(max_new_tokens=RESPONSE, eos_id=1)
    updates = {
        name: jax.jit(
            make_cgpo_update(
                models, tx, CGPOConfig(sampling=sampling, update=name, codpo_beta=CODPO_BETA)
            )
        )
        for name in ("crpg", "crraft", "codpo")
    }
    return {
        "data": data,
        "state": state,
        "reference": reference_update,
        "reference_codpo": reference_codpo_update,
        "updates": updates,
    }


def assert_same_params(actual, expected):
    # Two float32 computations of the same gradient (summation order differs).
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


FLAGS = np.array([[True, False, False], [False, True, True], [True, True, True], [False] * 3])


@pytest.mark.parametrize("flags", [np.zeros_like(FLAGS), FLAGS], ids=["all_pass", "flagged"])
def test_crpg_weights_each_unflagged_sample_by_its_calibrated_reward(setup, flags):
    data = {**setup["data"], "violations": jnp.asarray(flags)}
    state, _ = setup["updates"]["crpg"](setup["state"], data, jax.random.key(0))
    # g = (1/|B|) Σ ψ R_calib ∇ log π: all passing, the calibrated-reward policy gradient;
    # flagged samples get weight 0 while |B| still counts them.
    weights = np.asarray(data["calibrated_rewards"]) * ~flags / flags.size
    expected = setup["reference"](setup["state"].params["policy"], jnp.asarray(weights))
    assert_same_params(state.params["policy"], expected)


def test_crpg_gives_no_update_when_every_sample_is_flagged(setup):
    data = {**setup["data"], "violations": jnp.ones((PROMPTS, SAMPLES), bool)}
    state, _ = setup["updates"]["crpg"](setup["state"], data, jax.random.key(0))
    for new, old in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(setup["state"].params), strict=True
    ):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("flags", [np.zeros_like(FLAGS), FLAGS], ids=["all_pass", "flagged"])
def test_crraft_fits_the_best_unflagged_sample_of_each_prompt(setup, flags):
    data = {**setup["data"], "violations": jnp.asarray(flags)}
    state, _ = setup["updates"]["crraft"](setup["state"], data, jax.random.key(0))
    # RAFT on the feasible samples: per prompt the highest-reward unflagged sample (none
    # when all are flagged); the token NLL is averaged over the kept samples' tokens.
    rewards = np.where(flags, -np.inf, np.asarray(data["rewards"]))
    selected = np.zeros(flags.shape)
    for prompt in range(PROMPTS):
        if not flags[prompt].all():
            selected[prompt, np.argmax(rewards[prompt])] = 1.0
    weights = selected / (selected.sum() * RESPONSE)
    expected = setup["reference"](setup["state"].params["policy"], jnp.asarray(weights))
    assert_same_params(state.params["policy"], expected)
    assert not np.any(selected * flags)  # a flagged sample is never fitted


@pytest.mark.parametrize("flags", [np.zeros_like(FLAGS), FLAGS], ids=["all_pass", "flagged"])
def test_codpo_pairs_the_best_unflagged_sample_with_the_lowest_ranked(setup, flags):
    data = {**setup["data"], "violations": jnp.asarray(flags)}
    state, _ = setup["updates"]["codpo"](setup["state"], data, jax.random.key(0))
    # All passing: online DPO of the best against the worst sample. Flagged samples rank
    # below every unflagged one and are never chosen; a prompt whose samples are all
    # flagged has no pair.
    rewards = np.asarray(data["rewards"])
    chosen = np.zeros(PROMPTS, np.int32)
    rejected = np.zeros(PROMPTS, np.int32)
    for prompt in range(PROMPTS):
        feasible = np.flatnonzero(~flags[prompt])
        if feasible.size:
            chosen[prompt] = feasible[np.argmax(rewards[prompt, feasible])]
        others = [i for i in range(SAMPLES) if i != chosen[prompt]]
        flagged_others = [i for i in others if flags[prompt, i]]
        pool = flagged_others or others
        rejected[prompt] = pool[int(np.argmin(rewards[prompt, pool]))]
    valid = (~flags).any(axis=1)
    expected = setup["reference_codpo"](
        setup["state"].params["policy"],
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        jnp.asarray(valid, jnp.float32),
    )
    assert_same_params(state.params["policy"], expected)
    assert not np.any(flags[np.arange(PROMPTS), chosen] & valid)
