"""Logical-axis rules: from the model's axis names to the mesh's axes.

Every parameter of the model names its dimensions with logical axes (``'vocab'``,
``'embed'``, ``'mlp'``, ``'heads'``, ``'kv_heads'``, ``'head_dim'``) and batches name
their leading dimension ``'batch'``. A rule table maps each logical name to zero, one or
several mesh axes of the ``('data', 'fsdp', 'tensor')`` mesh built by
:mod:`rlhf_jax.parallel.mesh`. The default table is

============  ======================  ==============================================
logical       mesh axes               why
============  ======================  ==============================================
``batch``     ``('data', 'fsdp')``    data parallelism over both data-like axes
``embed``     ``'fsdp'``              fully sharded data parallel (ZeRO-3): every weight
                                      is split along its model-width axis
``mlp``       ``'tensor'``            Megatron column/row split of the MLP
``heads``     ``'tensor'``            attention heads split across devices
``kv_heads``  ``'tensor'``            grouped-query key/value heads likewise
``vocab``     ``'tensor'``            embedding table and logits split by token id
``head_dim``  ``None``                never split (it is contracted inside a head)
``layers``    ``None``                stacked-layer axis of scanned blocks
``length``    ``None``                sequence axis of activations
============  ======================  ==============================================

(Rajbhandari et al., 2020, "ZeRO"; Shoeybi et al., 2019, "Megatron-LM"; the table
follows the logical-axis convention of Flax's ``logical_to_mesh_axes``.)

Resolution of one array's logical ``PartitionSpec`` against a concrete shape:

* each logical name is looked up in the table (an unknown name is an error that lists
  the known ones: a typo must not silently replicate a weight);
* a mesh axis already used by an earlier dimension of the same array is dropped (a mesh
  axis may appear at most once in a ``PartitionSpec``);
* a mesh axis whose size does not divide what is left of the dimension is dropped, so
  the dimension is replicated over that axis instead of failing to shard (e.g. 2 KV heads
  on a tensor axis of 8). Every such drop is returned as a :class:`DroppedAxis` and
  logged at WARNING level, so a replicated weight is never silent.

Size-1 mesh axes are kept: they divide everything and shard nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGGER = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

DEFAULT_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class DroppedAxis:
    """A mesh axis that a rule asked for but that could not shard a dimension.

    Attributes:
      path: where the array sits in its tree (``jax.tree_util.keystr``), or ``""``.
      dim: index of the dimension.
      logical: the dimension's logical name.
      mesh_axis: the mesh axis that was dropped.
      dim_size: the dimension's size.
      reason: ``"not divisible"`` (the axis size does not divide the remaining size) or
        ``"already used"`` (an earlier dimension of the same array took the axis).
    """

    path: str
    dim: int
    logical: str
    mesh_axis: str
    dim_size: int
    reason: str


def _rule_table(rules: LogicalRules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            table[logical] = ()
        elif isinstance(mesh_axes, str):
            table[logical] = (mesh_axes,)
        else:
            table[logical] = tuple(mesh_axes)
    return table


def mesh_axes_for(logical: str, rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes that ``rules`` assign to one logical axis name.

    Args:
      logical: a logical axis name such as ``'embed'``.
      rules: ``(logical, mesh_axes)`` pairs; ``mesh_axes`` is a name, a tuple of names or
        ``None``.

    Returns:
      The mesh axes, outermost first (``()`` for an unsharded axis).

    Raises:
      KeyError: ``logical`` has no rule; the message lists the names that have one.
    """
    table = _rule_table(rules)
    if logical not in table:
        raise KeyError(
            f"logical axis {logical!r} has no sharding rule; known logical axes: {sorted(table)}"
        )
    return table[logical]


def _drop_reason(already_used: bool, remaining: int, axis_size: int) -> str | None:
    if already_used:
        return "already used"
    if remaining % axis_size:
        return "not divisible"
    return None


def resolve_spec(
    logical_spec: PartitionSpec | Sequence[Any] | None,
    shape: Sequence[int],
    mesh_axis_sizes: Mapping[str, int],
    rules: LogicalRules = DEFAULT_RULES,
    *,
    path: str = "",
) -> tuple[PartitionSpec, tuple[DroppedAxis, ...]]:
    """Turn one array's logical ``PartitionSpec`` into a mesh ``PartitionSpec``.

    Args:
      logical_spec: one entry per leading dimension: a logical name, a tuple of logical
        names, or ``None``; ``None`` (the whole spec) means replicated. Shorter than
        ``shape`` means the trailing dimensions are replicated.
      shape: the array's shape.
      mesh_axis_sizes: ``mesh.shape`` (axis name -> size).
      rules: the rule table (see the module docstring).
      path: the array's location, only used in the dropped-axis records.

    Returns:
      ``(mesh_spec, dropped)``: the spec over mesh axes, one entry per dimension of
      ``shape`` (``None``, one axis name, or a tuple of axis names), and the mesh axes
      that were dropped, with the reason.

    Raises:
      ValueError: the logical spec has more entries than the array has dimensions, or a
        rule names a mesh axis the mesh does not have.
      KeyError: a logical name has no rule.
    """
    entries = tuple(logical_spec) if logical_spec is not None else ()
    if len(entries) > len(shape):
        raise ValueError(
            f"{path or 'array'}: logical spec {entries} has {len(entries)} entries but the "
            f"array has shape {tuple(shape)}"
        )
    used: set[str] = set()
    dropped: list[DroppedAxis] = []
    mesh_spec: list[Any] = []
    for dim, size in enumerate(shape):
        entry = entries[dim] if dim < len(entries) else None
        logical_names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        kept: list[str] = []
        remaining = int(size)
        for logical in logical_names:
            for axis in mesh_axes_for(logical, rules):
                if axis not in mesh_axis_sizes:
                    raise ValueError(
                        f"rule for {logical!r} names mesh axis {axis!r}, but the mesh axes "
                        f"are {tuple(mesh_axis_sizes)}"
                    )
                reason = _drop_reason(axis in used, remaining, mesh_axis_sizes[axis])
                if reason is None:
                    kept.append(axis)
                    used.add(axis)
                    remaining //= mesh_axis_sizes[axis]
                else:
                    dropped.append(DroppedAxis(path, dim, logical, axis, int(size), reason))
        mesh_spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*mesh_spec), tuple(dropped)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def logical_to_mesh_specs(
    logical_specs: Any,
    arrays: Any,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> tuple[Any, tuple[DroppedAxis, ...]]:
    """Resolve a tree of logical ``PartitionSpec`` s against a tree of arrays.

    Args:
      logical_specs: a tree whose leaves are logical ``PartitionSpec`` s (or ``None``),
        one per array leaf of ``arrays`` in the same order, e.g.
        ``nnx.get_partition_spec(params)``.
      arrays: a tree of arrays or ``jax.ShapeDtypeStruct`` s (only shapes are read). The
        result has this tree's structure.
      mesh: the device mesh.
      rules: the rule table.

    Returns:
      ``(mesh_specs, dropped)``: a tree shaped like ``arrays`` with a mesh
      ``PartitionSpec`` per leaf, and every dropped mesh axis (also logged).

    Raises:
      ValueError: the two trees have different numbers of leaves.
    """
    spec_leaves = jax.tree.leaves(logical_specs, is_leaf=_is_spec)
    paths_and_arrays, treedef = jax.tree.flatten_with_path(arrays)
    if len(spec_leaves) != len(paths_and_arrays):
        raise ValueError(
            f"{len(spec_leaves)} logical specs for {len(paths_and_arrays)} arrays: the spec "
            "tree must mirror the array tree"
        )
    resolved = []
    dropped: list[DroppedAxis] = []
    for spec, (path, array) in zip(spec_leaves, paths_and_arrays, strict=True):
        mesh_spec, leaf_dropped = resolve_spec(
            spec, array.shape, dict(mesh.shape), rules, path=jax.tree_util.keystr(path)
        )
        resolved.append(mesh_spec)
        dropped.extend(leaf_dropped)
    for item in dropped:
        LOGGER.warning(
            "%s: dimension %d (%s, size %d) not sharded over mesh axis %r (%s of size %d)",
            item.path,
            item.dim,
            item.logical,
            item.dim_size,
            item.mesh_axis,
            item.reason,
            mesh.shape[item.mesh_axis],
        )
    return jax.tree.unflatten(treedef, resolved), tuple(dropped)


def logical_to_shardings(
    logical_specs: Any,
    arrays: Any,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> tuple[Any, tuple[DroppedAxis, ...]]:
    """Like :func:`logical_to_mesh_specs`, with ``NamedSharding(mesh, spec)`` leaves."""
    mesh_specs, dropped = logical_to_mesh_specs(logical_specs, arrays, mesh, rules)
    shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return shardings, dropped
