import itertools
import logging

import jax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import rules
from rlhf_jax.parallel.mesh import make_mesh

SIZES = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    ("logical", "mesh_axes"),
    [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("head_dim", None),
    ],
)
def test_default_rule_for_each_logical_axis(logical, mesh_axes):
    spec, dropped = rules.resolve_spec(P(logical), (8,), SIZES)
    assert spec == P(mesh_axes)
    assert dropped == ()


def test_weight_spec_resolves_dimension_by_dimension():
    spec, dropped = rules.resolve_spec(P("embed", "heads", "head_dim"), (16, 8, 4), SIZES)
    assert spec == P("fsdp", "tensor", None)
    assert dropped == ()
    # A shorter spec leaves trailing dimensions replicated; None replicates everything.
    assert rules.resolve_spec(P("vocab"), (8, 4), SIZES)[0] == P("tensor", None)
    assert rules.resolve_spec(None, (8, 4), SIZES)[0] == P(None, None)


def test_axis_that_does_not_divide_is_dropped_and_reported(caplog):
    # Two KV heads cannot be split 8 ways: replicated over 'tensor', and reported.
    sizes = {"data": 1, "fsdp": 1, "tensor": 8}
    spec, dropped = rules.resolve_spec(P("embed", "kv_heads"), (16, 2), sizes, path="wk")
    assert spec == P("fsdp", None)
    assert dropped == (rules.DroppedAxis("wk", 1, "kv_heads", "tensor", 2, "not divisible"),)
    # Through the tree API the drop is logged with the array's path.
    arrays = {"wk": jax.ShapeDtypeStruct((16, 2), "float32")}
    mesh = make_mesh((1, 1, 8))
    with caplog.at_level(logging.WARNING, logger=rules.__name__):
        specs, dropped = rules.logical_to_mesh_specs({"wk": P("embed", "kv_heads")}, arrays, mesh)
    assert specs == {"wk": P("fsdp", None)}
    assert len(dropped) == 1
    assert "['wk']" in caplog.text and "'tensor'" in caplog.text


def test_batch_keeps_the_axes_that_still_divide():
    # Batch of 2 on data=2, fsdp=2: 'data' splits it in two, nothing is left for 'fsdp'.
    spec, dropped = rules.resolve_spec(P("batch"), (2, 5), SIZES)
    assert spec == P("data", None)
    assert [(d.mesh_axis, d.reason) for d in dropped] == [("fsdp", "not divisible")]


def test_a_mesh_axis_is_never_used_twice_in_one_spec():
    names = [logical for logical, _ in rules.DEFAULT_RULES]
    for first, second in itertools.product(names, repeat=2):
        spec, _ = rules.resolve_spec(P(first, second), (8, 8), SIZES)
        used = [
            a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)
        ]
        assert len(used) == len(set(used)), (first, second, spec)
    spec, dropped = rules.resolve_spec(P("mlp", "heads"), (8, 8), SIZES)
    assert spec == P("tensor", None)
    assert dropped[0].reason == "already used"


def test_unknown_logical_axis_is_an_error_listing_known_ones():
    with pytest.raises(KeyError, match=r"'embd' has no sharding rule.*'embed'"):
        rules.resolve_spec(P("embd"), (8,), SIZES)


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    with pytest.raises(ValueError, match=r"mesh axis 'expert'"):
        rules.resolve_spec(P("mlp"), (8,), SIZES, rules=(("mlp", "expert"),))


def test_spec_tree_must_mirror_array_tree():
    mesh = make_mesh((1, 1, 8))
    arrays = {"a": jax.ShapeDtypeStruct((8,), "float32")}
    with pytest.raises(ValueError, match="2 logical specs for 1 arrays"):
        rules.logical_to_mesh_specs([P("mlp"), P("mlp")], arrays, mesh)
