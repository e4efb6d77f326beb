"""Every real training step and the sampler, sharded over a mesh, equal the one-device run."""

import functools

import jax
import numpy as np
import parallel_real_steps as real
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import param_shardings, rules, sharded_sampler, state_shardings
from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import make_optimizer

ONE_DEVICE = (1, 1, 1)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
# Tolerances. Every mesh runs the same f32 programme; only the order of the reductions
# (the gradient all-reduce over data x fsdp, the contractions split over tensor) differs,
# which perturbs values by a few ulps (~1e-7 relative). With plain SGD (see
# parallel_real_steps) the parameters then agree to about lr * 1e-7 * |g| < 1e-6, so an
# absolute 1e-5 on every state leaf has headroom yet is 100x finer than the smallest
# update checked below; the losses and metrics agree to 1e-5 relative.
STATE_ATOL = 1e-5
LOSS_RTOL = 1e-5
MIN_UPDATE = 1e-3


@functools.cache
def one_step(kind, mesh_shape):
    """(initial host state, new host state, host metrics) of one step on ``mesh_shape``."""
    step = real.compiled_step(kind, mesh_shape)
    state, metrics = step(step.initial_state(), step.batch, real.step_key(0))
    return step.initial, real.host(state), real.host(metrics)


def assert_states_close(actual, expected):
    paths_and_leaves, _ = jax.tree.flatten_with_path(expected)
    for (path, want), got in zip(paths_and_leaves, jax.tree.leaves(actual), strict=True):
        np.testing.assert_allclose(
            np.asarray(got),
            np.asarray(want),
            rtol=0,
            atol=STATE_ATOL,
            err_msg=jax.tree_util.keystr(path),
        )


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("kind", real.KINDS)
def test_one_sharded_step_equals_the_one_device_step(kind, mesh_shape):
    _, expected_state, expected_metrics = one_step(kind, ONE_DEVICE)
    _, state, metrics = one_step(kind, mesh_shape)
    assert not metrics["nonfinite"] and not expected_metrics["nonfinite"]
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=LOSS_RTOL)
    # Every metric: for the sampling steps this includes the response lengths, EOS rate
    # and reward scores of the rollout, so the sampled tokens were the same on every mesh.
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=LOSS_RTOL, atol=1e-6, err_msg=name)
    # Parameters, optimiser state and algorithm state (KL coefficient, multiplier, frozen
    # models, which must come back unchanged).
    assert_states_close(state, expected_state)


@pytest.mark.parametrize("kind", real.KINDS)
def test_each_step_moves_parameters_far_beyond_the_tolerance(kind):
    initial, state, _ = one_step(kind, ONE_DEVICE)
    largest = max(
        float(np.max(np.abs(new - old)))
        for new, old in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(initial.params), strict=True
        )
    )
    assert largest > MIN_UPDATE, largest
    # The frozen models in extra are not trained.
    for key, value in initial.extra.items():
        if key.endswith("_params"):
            assert_states_close(state.extra[key], value)


TENSOR_AXES = {"vocab", "mlp", "heads", "kv_heads"}
# A frozen model given its own rules: tensor-parallel only, never split over fsdp.
TENSOR_ONLY_RULES = tuple(
    (logical, None if logical == "embed" else axes) for logical, axes in rules.DEFAULT_RULES
)


def expected_shard_shape(shape, names, fsdp, tensor, embed_sharded=True):
    # The default table written out: 'embed' over fsdp, the tensor-parallel axes over
    # tensor, every other axis whole (every size here divides by 8).
    names = tuple(names) + (None,) * (len(shape) - len(names))
    ways = {name: tensor for name in TENSOR_AXES}
    if embed_sharded:
        ways["embed"] = fsdp
    return tuple(size // ways.get(name, 1) for size, name in zip(shape, names, strict=True))


def logical_names(tree):
    specs = nnx.get_partition_spec(tree)
    return [
        tuple(spec or ())
        for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    ]


@pytest.fixture(scope="module")
def dpo_state():
    """A DPO state: decoder params, AdamW moments (a real optimiser), frozen reference."""
    _, policy = real.decoder(0)
    _, reference = real.decoder(1)
    tx = make_optimizer(learning_rate=1e-3, num_steps=10, warmup_steps=2)
    state = TrainState.create(policy, tx, 0, {"reference_params": reference, "beta": 0.1})
    return state, tx


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 1, 8)])
def test_params_optimizer_state_and_frozen_model_are_really_split(dpo_state, mesh_shape):
    state, tx = dpo_state
    mesh = real.mesh_of(mesh_shape)
    shardings = state_shardings(
        state, tx, mesh, extra_rules={"reference_params": TENSOR_ONLY_RULES}
    )
    placed = jax.device_put(state, shardings)
    _, fsdp, tensor = mesh_shape
    names = logical_names(state.params)
    params = jax.tree.leaves(placed.params)
    adam = placed.opt_state[1][0]  # chain(clip, adamw): adamw = (scale_by_adam, ...)
    for moment in (adam.mu, adam.nu):
        assert len(jax.tree.leaves(moment)) == len(params)
    for index, (param, name) in enumerate(zip(params, names, strict=True)):
        expected = expected_shard_shape(param.shape, name, fsdp, tensor)
        for array in (param, jax.tree.leaves(adam.mu)[index], jax.tree.leaves(adam.nu)[index]):
            assert len(array.addressable_shards) == 8
            assert {s.data.shape for s in array.addressable_shards} == {expected}, name
    # The reference follows its own rules: on (1, 8, 1) it is whole on every device.
    reference = jax.tree.leaves(placed.extra["reference_params"])
    for array, name in zip(reference, logical_names(state.extra["reference_params"]), strict=True):
        expected = expected_shard_shape(array.shape, name, fsdp, tensor, embed_sharded=False)
        assert array.addressable_shards[0].data.shape == expected, name
    # Hand-written spot checks: the [64, 32] embedding and the [32, 8, 4] query kernel.
    embedding = placed.params["token_embedding"]
    query = placed.params["layers"][0]["attn"]["query"]["kernel"]
    assert (
        embedding.addressable_shards[0].data.shape
        == {(1, 8, 1): (64, 4), (1, 1, 8): (8, 32)}[mesh_shape]
    )
    assert (
        query.addressable_shards[0].data.shape
        == {(1, 8, 1): (4, 8, 4), (1, 1, 8): (32, 1, 4)}[mesh_shape]
    )
    # Step, key, counts and the scalar hyper-parameter are replicated.
    for leaf in (placed.step, placed.rng, placed.extra["beta"], adam.count):
        assert leaf.sharding.is_fully_replicated


def test_optimizer_state_found_by_structure_matches_optax(dpo_state):
    state, tx = dpo_state
    mesh = real.mesh_of((2, 2, 2))
    by_optax = state_shardings(state, tx, mesh).opt_state
    by_structure = state_shardings(state, None, mesh).opt_state
    assert jax.tree.structure(by_optax) == jax.tree.structure(by_structure)
    assert jax.tree.leaves(by_optax) == jax.tree.leaves(by_structure)
    assert jax.tree.leaves(by_optax[1][0].mu) == jax.tree.leaves(
        param_shardings(state.params, mesh)
    )


def test_rules_for_an_unknown_extra_entry_are_an_error(dpo_state):
    state, tx = dpo_state
    with pytest.raises(KeyError, match=r"\['critic_params'\].*'beta', 'reference_params'"):
        state_shardings(state, tx, real.mesh_of((1, 8, 1)), extra_rules={"critic_params": ()})


@pytest.fixture(scope="module")
def samples():
    """Sampled rollouts of the same prompts and key on one device and on (2, 2, 2)."""
    graphdef, params = real.decoder(0)
    prompts = real.prompt_batch(3)
    outputs = {}
    for mesh_shape in (ONE_DEVICE, (2, 2, 2)):
        mesh = real.mesh_of(mesh_shape)
        shardings = param_shardings(params, mesh)
        sample = sharded_sampler(graphdef, real.SAMPLING, mesh, shardings)
        outputs[mesh_shape] = sample(
            jax.device_put(params, shardings),
            prompts["input_ids"],
            prompts["attention_mask"],
            jax.random.key(7),
        )
    return outputs, sample, params, prompts


def test_sharded_sampler_draws_the_same_tokens_on_any_mesh(samples):
    outputs, _, _, _ = samples
    one, sharded = outputs[ONE_DEVICE], outputs[(2, 2, 2)]
    # Random decoding (not greedy): partitionable threefry keys give identical draws.
    assert jax.config.jax_threefry_partitionable
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.response_mask), np.asarray(one.response_mask))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(one.logprobs), atol=1e-5)
    # The prompts' rows stayed split over data x fsdp = 4 devices: 2 rows each.
    assert sharded.tokens.addressable_shards[0].data.shape == (2, real.PROMPT + real.NEW)
    assert np.asarray(one.response_mask).sum() > real.BATCH  # more than one token each


def test_sharded_sampler_names_a_batch_the_mesh_cannot_split(samples):
    _, sample, params, prompts = samples
    with pytest.raises(ValueError, match=r"leading size 6, not a multiple of data \* fsdp = 4"):
        sample(params, prompts["input_ids"][:6], prompts["attention_mask"][:6], jax.random.key(0))


def test_checkpoint_saved_on_fsdp_restores_onto_another_mesh_and_continues(tmp_path):
    source, target = real.compiled_step("sft", (1, 8, 1)), real.compiled_step("sft", (2, 2, 2))
    state, _ = source(source.initial_state(), real.sft_batch(0), real.step_key(0))
    checkpointer = Checkpointer(tmp_path, save_every=1, async_save=False)
    checkpointer.save(1, state, {"mesh": "1x8x1"})
    checkpointer.wait()
    restored, metadata = checkpointer.restore(abstract_state(state, target.sharded.state_sharding))
    checkpointer.close()
    assert metadata == {"mesh": "1x8x1"}
    for leaf, expected in zip(
        jax.tree.leaves(restored), jax.tree.leaves(target.sharded.state_sharding), strict=True
    ):
        assert leaf.sharding == expected

    batch, key = real.sft_batch(1), real.step_key(1)
    resumed, resumed_metrics = target(restored, batch, key)
    continued, continued_metrics = source(state, batch, key)
    # Same values on either mesh before the step: reduction-order noise only (see above).
    np.testing.assert_allclose(resumed_metrics["loss"], continued_metrics["loss"], rtol=LOSS_RTOL)
    assert_states_close(real.host(resumed), real.host(continued))
