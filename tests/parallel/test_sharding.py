import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import parallel_tiny_lm as tiny
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Decoder
from rlhf_jax.parallel import sharding
from rlhf_jax.parallel.mesh import make_mesh

# Eight query heads (split 8 ways), two key/value heads (cannot be split 8 ways).
DECODER_CONFIG = ModelConfig.llama(
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=8,
    num_kv_heads=2,
    head_dim=4,
    mlp_hidden_size=64,
    max_position_embeddings=16,
)
TENSOR_AXES = {"vocab", "mlp", "heads", "kv_heads"}


@pytest.fixture(scope="module")
def decoder():
    """(graphdef, params) of the project's decoder, built once."""
    return nnx.split(Decoder(DECODER_CONFIG, rngs=nnx.Rngs(0)), nnx.Param)


@pytest.fixture(scope="module")
def decoder_params(decoder):
    return decoder[1]


def _expected_shard_shape(shape, names, fsdp, tensor):
    # The layout the default rules promise, written out per dimension: 'embed' over fsdp,
    # the tensor-parallel axes over tensor, each only if the size divides (else whole).
    out = []
    for size, name in zip(shape, names, strict=True):
        ways = fsdp if name == "embed" else tensor if name in TENSOR_AXES else 1
        out.append(size // ways if size % ways == 0 else size)
    return tuple(out)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_decoder_params_are_split_across_devices(decoder_params, mesh_shape):
    mesh = make_mesh(mesh_shape)
    placed = sharding.shard_params(decoder_params, mesh)
    names = jax.tree.leaves(
        nnx.get_partition_spec(decoder_params), is_leaf=lambda x: isinstance(x, P)
    )
    originals = jax.tree.leaves(decoder_params)
    for original, array, spec in zip(originals, jax.tree.leaves(placed), names, strict=True):
        expected = _expected_shard_shape(original.shape, spec, mesh_shape[1], mesh_shape[2])
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape == expected, (spec, original.shape)
        np.testing.assert_array_equal(np.asarray(array), np.asarray(original))

    # Spot checks by hand: the [V=64, E=32] embedding and the [E, K=2, D=4] key kernel,
    # found by their logical axes.
    by_names = {
        tuple(spec): array for spec, array in zip(names, jax.tree.leaves(placed), strict=True)
    }
    embedding = by_names[("vocab", "embed")]
    key_kernel = by_names[("embed", "kv_heads", "head_dim")]
    expected = {
        (1, 8, 1): ((64, 4), (4, 2, 4)),
        (1, 1, 8): ((8, 32), (32, 2, 4)),  # 2 KV heads stay whole on 8-way tensor
        (2, 2, 2): ((32, 16), (16, 1, 4)),
    }[mesh_shape]
    assert embedding.addressable_shards[0].data.shape == expected[0]
    assert key_kernel.addressable_shards[0].data.shape == expected[1]


def test_optimizer_state_is_sharded_like_params(decoder_params):
    mesh = make_mesh((1, 8, 1))
    param_shardings = sharding.param_shardings(decoder_params, mesh)
    tx = optax.adamw(1e-3)
    opt_shardings = sharding.optimizer_state_shardings(tx, decoder_params, param_shardings)
    adam = opt_shardings[0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(param_shardings)
    assert jax.tree.leaves(adam.nu) == jax.tree.leaves(param_shardings)
    assert adam.count == NamedSharding(mesh, P())
    # The shardings are usable as-is: init under jit lands the moments split 8 ways.
    params = jax.device_put(decoder_params, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    for moment, param in zip(
        jax.tree.leaves(opt_state[0].mu), jax.tree.leaves(params), strict=True
    ):
        assert moment.addressable_shards[0].data.shape == param.addressable_shards[0].data.shape


def test_batch_is_split_over_data_and_fsdp():
    mesh = make_mesh((2, 2, 2))
    batch = {"tokens": np.zeros((8, 5), np.int32), "weight": np.float32(1.0)}
    shardings = sharding.batch_shardings(batch, mesh)
    placed = jax.device_put(batch, shardings)
    assert placed["tokens"].addressable_shards[0].data.shape == (2, 5)
    assert placed["weight"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match=r"\['tokens'\] has leading size 6.*data \* fsdp = 4"):
        sharding.batch_shardings({"tokens": np.zeros((6, 5))}, mesh)


def test_abstract_arrays_insist_on_a_concrete_mesh():
    mesh = make_mesh((1, 8, 1))
    leaf = jax.ShapeDtypeStruct((8, 4), np.float32)
    abstract = sharding.abstract_arrays({"w": leaf}, {"w": NamedSharding(mesh, P("fsdp"))})
    assert abstract["w"].sharding.mesh == mesh
    abstract_mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(TypeError, match="AbstractMesh"):
        sharding.abstract_arrays({"w": leaf}, {"w": NamedSharding(abstract_mesh, P("fsdp"))})


@pytest.fixture(scope="module")
def unsharded_reference():
    """Three steps of the same model and optimizer, plain jax.jit on one device."""
    graphdef, params = nnx.split(tiny.make_model(), nnx.Param)
    tx = tiny.make_tx()
    step = jax.jit(tiny.make_train_step(graphdef, tx))
    state, losses = (params, tx.init(params)), []
    for tokens in tiny.make_tokens(3):
        state, loss = step(state, tokens)
        losses.append(float(loss))
    return state, losses


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 1)])
def test_sharded_training_matches_unsharded(run_on, unsharded_reference, mesh_shape):
    run = run_on(mesh_shape)
    state, losses = run.train(run.initial_state(), tiny.make_tokens(3))
    reference_state, reference_losses = unsharded_reference
    # Same f32 maths, different reduction orders across devices. Losses agree to 1e-5
    # relative; params to 1e-5 absolute: Adam's m / sqrt(v) turns ulp-level noise in a
    # near-zero gradient into up to ~1e-5 of movement, a thousandth of one lr=1e-2 step.
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for leaf, expected in zip(
        jax.tree.leaves(state), jax.tree.leaves(reference_state), strict=True
    ):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # The step kept every parameter on its mesh sharding (no silent gather).
    for leaf, expected in zip(
        jax.tree.leaves(state[0]), jax.tree.leaves(run.param_shardings), strict=True
    ):
        assert leaf.sharding == expected


def test_checkpoint_saved_on_fsdp_restores_onto_another_mesh(run_on, tmp_path):
    source, target = run_on((1, 8, 1)), run_on((2, 2, 2))
    first, second = tiny.make_tokens(2)
    state, _ = source.train(source.initial_state(), [first])

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "step1", state)
    checkpointer.wait_until_finished()
    restore_target = sharding.abstract_arrays(state, target.state_shardings)
    restored = checkpointer.restore(tmp_path / "step1", restore_target)
    for leaf, expected in zip(
        jax.tree.leaves(restored), jax.tree.leaves(target.state_shardings), strict=True
    ):
        assert leaf.sharding == expected

    continued, continued_loss = source.train(state, [second])
    resumed, resumed_loss = target.train(restored, [second])
    # One step on either mesh from the same values: f32 reduction-order noise only
    # (tolerances as in test_sharded_training_matches_unsharded).
    np.testing.assert_allclose(resumed_loss, continued_loss, rtol=1e-5)
    for leaf, expected in zip(jax.tree.leaves(resumed), jax.tree.leaves(continued), strict=True):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_decoder_forward_is_unchanged_by_tensor_parallel_sharding(decoder):
    # Query heads split 8 ways while the 2 KV heads stay whole (grouped-query attention
    # across a dropped axis): the logits must not change beyond f32 reduction order.
    graphdef, decoder_params = decoder
    tokens = tiny.make_tokens(1)[0] % DECODER_CONFIG.vocab_size

    def logits(params, tokens):
        return nnx.merge(graphdef, params)(tokens)[0]

    expected = jax.jit(logits)(decoder_params, tokens)
    mesh = make_mesh((1, 1, 8))
    param_shardings = sharding.param_shardings(decoder_params, mesh)
    forward = sharding.jit_sharded(
        logits,
        mesh,
        in_shardings=(param_shardings, P()),
        out_shardings=P(None, None, "tensor"),
    )
    actual = forward(sharding.shard_params(decoder_params, mesh), tokens)
    assert actual.addressable_shards[0].data.shape == (8, 8, 8)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)
