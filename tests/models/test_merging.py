import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig, merging


def make_tree(seed):
    """A mixed-dtype parameter tree: two float32 leaves and a bfloat16 one."""
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.float32),
        },
        "scale": jnp.asarray(rng.normal(size=2), jnp.bfloat16),
    }


def as64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_trees_equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u, np.float64), np.asarray(v, np.float64))


def assert_close_to(merged, expected):
    # float32 leaves: a few ulps of O(1) values. bfloat16 leaves: one final rounding to
    # 8 significant bits, relative error ≤ 2⁻⁸ of values ≲ 3, so 2⁻⁶ absolute.
    np.testing.assert_allclose(merged["dense"]["w"], expected["dense"]["w"], atol=1e-5)
    np.testing.assert_allclose(merged["dense"]["b"], expected["dense"]["b"], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(merged["scale"], np.float64), expected["scale"], atol=2**-6
    )


def test_end_points_are_exact_and_the_merge_is_linear():
    a, b = make_tree(0), make_tree(1)
    assert_trees_equal(merging.interpolate(a, b, 0.0), a)
    assert_trees_equal(merging.interpolate(a, b, 1.0), b)
    for t in (0.25, 0.7, 1.5, -0.5):  # extrapolation follows the same line
        merged = merging.interpolate(a, b, t)
        assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, a)
        assert_close_to(merged, jax.tree.map(lambda x, y, t=t: x + t * (y - x), as64(a), as64(b)))


def test_interpolation_runs_under_jit_with_a_traced_weight():
    a, b = make_tree(0), make_tree(1)
    merged = jax.jit(merging.interpolate)(a, b, jnp.float32(0.3))
    assert_close_to(merged, jax.tree.map(lambda x, y: 0.7 * x + 0.3 * y, as64(a), as64(b)))


def test_balanced_actor_initialization_is_the_two_stage_formula():
    instruct, reasoning, pretrained = make_tree(0), make_tree(1), make_tree(2)
    merged = merging.balanced_actor_initialization(
        instruct, reasoning, pretrained, instruct_weight=0.6, merged_weight=0.8
    )
    expected = jax.tree.map(
        lambda i, r, p: 0.8 * (0.6 * i + 0.4 * r) + 0.2 * p,
        as64(instruct),
        as64(reasoning),
        as64(pretrained),
    )
    assert_close_to(merged, expected)
    # Stage 2 is a task-vector scaling of the stage-1 model relative to the base model.
    stage_one = merging.interpolate(reasoning, instruct, 0.6)
    via_task_vector = merging.add_task_vectors(
        pretrained, [merging.task_vector(stage_one, pretrained)], [0.8]
    )
    assert_close_to(via_task_vector, as64(merged))
    # Weights 1 and 1 keep the instruction model; 0 in stage 2 returns the base model.
    one = merging.balanced_actor_initialization(
        instruct, reasoning, pretrained, instruct_weight=1.0, merged_weight=1.0
    )
    assert_trees_equal(one, instruct)
    base = merging.balanced_actor_initialization(
        instruct, reasoning, pretrained, instruct_weight=0.5, merged_weight=0.0
    )
    assert_trees_equal(base, pretrained)


def test_task_arithmetic_adds_and_negates():
    base, first, second = make_tree(0), make_tree(1), make_tree(2)
    tau1, tau2 = merging.task_vector(first, base), merging.task_vector(second, base)
    merged = merging.add_task_vectors(base, [tau1, tau2], [1.0, -0.5])
    expected = jax.tree.map(
        lambda b, x, y: b + (x - b) - 0.5 * (y - b), as64(base), as64(first), as64(second)
    )
    assert_close_to(merged, expected)


def test_mismatched_or_integer_trees_are_rejected_by_name():
    a = make_tree(0)
    with pytest.raises(ValueError, match="structure"):
        merging.interpolate(a, {"dense": a["dense"]}, 0.5)
    with pytest.raises(ValueError, match=r"\['step'\].*int32"):
        merging.interpolate(
            {"step": jnp.zeros(2, jnp.int32)}, {"step": jnp.ones(2, jnp.int32)}, 0.5
        )


def random_state(abstract, seed):
    """Fill an abstract parameter state with N(0, 0.1²) noise (norm gains 1 + that)."""
    rng = np.random.default_rng(seed)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        value = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.standard_normal(shape)
        leaves.append((path, variable.replace(jnp.asarray(value, dtype))))
    return nnx.from_flat_state(leaves)


def test_merging_decoder_states():
    config = ModelConfig.llama(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, mlp_hidden_size=32
    )
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param
    )
    state_a, state_b = random_state(abstract, 0), random_state(abstract, 1)
    merged = merging.interpolate(state_a, state_b, 0.25)
    assert isinstance(merged, nnx.State)
    assert jax.tree.structure(merged) == jax.tree.structure(state_a)
    for m, x, y in zip(
        jax.tree.leaves(merged), jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True
    ):
        assert m.dtype == x.dtype
        np.testing.assert_allclose(m, 0.75 * x + 0.25 * y, atol=1e-6)

    # The merged state builds a working model; the end point reproduces model a exactly.
    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    tokens = jnp.array([[3, 1, 4, 1, 5]])
    logits_a = forward(state_a, tokens)
    np.testing.assert_array_equal(
        forward(merging.interpolate(state_a, state_b, 0.0), tokens), logits_a
    )
    logits_mid = forward(merged, tokens)
    assert logits_mid.shape == logits_a.shape and bool(jnp.all(jnp.isfinite(logits_mid)))
