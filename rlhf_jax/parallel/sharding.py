"""Placing parameters, optimizer state and batches on a mesh; jitting steps over it.

Parameters carry logical axis names (Flax NNX ``nnx.with_partitioning`` metadata, read
with ``nnx.get_partition_spec``); :mod:`rlhf_jax.parallel.rules` turns them into mesh
``PartitionSpec`` s. Optimizer state is sharded "like the parameters": every optax state
leaf that mirrors a parameter (Adam's first and second moments, for instance) gets that
parameter's sharding and everything else (step counts, scalars) is replicated, which is
what makes FSDP shard the optimizer state too (ZeRO stage 1-3, Rajbhandari et al., 2020).
Batches are split along their leading axis over ``('data', 'fsdp')``.

A step is jitted once with explicit ``in_shardings`` / ``out_shardings`` (pjit) and
donates its state. Restoring a checkpoint onto a different mesh needs an abstract target
(``jax.ShapeDtypeStruct`` with a concrete ``NamedSharding``): :func:`abstract_arrays`
builds one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.rules import BATCH_AXES, DEFAULT_RULES, LogicalRules, logical_to_shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(
    params: Any,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    logical_specs: Any = None,
) -> Any:
    """Mesh shardings of a parameter tree from its logical axis names.

    Args:
      params: an ``nnx.State`` (or any pytree) of arrays or ``jax.ShapeDtypeStruct`` s.
      mesh: the ``('data', 'fsdp', 'tensor')`` mesh.
      rules: logical-to-mesh rules.
      logical_specs: a tree of logical ``PartitionSpec`` s mirroring ``params``; by
        default ``nnx.get_partition_spec(params)`` (arrays without metadata replicate).

    Returns:
      A tree with the structure of ``params`` and ``NamedSharding`` leaves. Mesh axes
      that could not shard a dimension are logged (see :mod:`rlhf_jax.parallel.rules`).
    """
    if logical_specs is None:
        logical_specs = nnx.get_partition_spec(params)
    shardings, _ = logical_to_shardings(logical_specs, params, mesh, rules)
    return shardings


def shard_params(
    params: Any,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    logical_specs: Any = None,
) -> Any:
    """Place ``params`` on ``mesh`` by their logical axes (see :func:`param_shardings`).

    An array that already has its target sharding is returned as is (no copy): copy it
    first if the caller keeps it and a step later donates the placed tree.
    """
    return jax.device_put(params, param_shardings(params, mesh, rules, logical_specs=logical_specs))


def optimizer_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any
) -> Any:
    """Shardings for ``tx.init(params)``: parameter-shaped leaves like the parameters.

    The optimizer state is traced with ``jax.eval_shape`` (nothing is allocated); each
    subtree that mirrors ``params`` (``optax.tree_map_params``) takes ``param_shardings``
    leaf by leaf, every other leaf (counts, scalars, schedule state) is replicated.

    Args:
      tx: the optax transformation.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` s).
      param_shardings: their shardings, a tree with the structure of ``params``.

    Returns:
      A tree with the structure of ``tx.init(params)`` and ``NamedSharding`` leaves.
    """
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    abstract_state = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def batch_spec(ndim: int = 1) -> PartitionSpec:
    """``PartitionSpec`` splitting the leading axis over ``('data', 'fsdp')`` (rank 0: none)."""
    return PartitionSpec(BATCH_AXES) if ndim > 0 else PartitionSpec()


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Shardings splitting every leaf of ``batch`` along its leading (example) axis.

    Args:
      batch: a tree of arrays or ``jax.ShapeDtypeStruct`` s with a shared leading batch
        axis; rank-0 leaves are replicated.
      mesh: the mesh; the leading axis is split over ``data * fsdp`` devices.

    Returns:
      A tree of ``NamedSharding`` s shaped like ``batch``.

    Raises:
      ValueError: a leading size is not a multiple of ``data * fsdp``; names the leaf.
    """
    ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def sharding(path: Any, leaf: Any) -> NamedSharding:
        if leaf.ndim and leaf.shape[0] % ways:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading size {leaf.shape[0]}, "
                f"not a multiple of data * fsdp = {ways}"
            )
        return NamedSharding(mesh, batch_spec(leaf.ndim))

    return jax.tree.map_with_path(sharding, batch)


def _as_sharding(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s,
        tree,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def jit_sharded(
    fn: Callable[..., Any],
    mesh: Mesh,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | Sequence[int] = (),
) -> Callable[..., Any]:
    """``jax.jit`` with explicit shardings (pjit), run with ``mesh`` as the current mesh.

    ``PartitionSpec`` leaves in the sharding trees are bound to ``mesh``. Calls run under
    ``jax.set_mesh(mesh)`` so that sharding constraints written with bare
    ``PartitionSpec`` s inside ``fn`` resolve against the same mesh.

    Args:
      fn: the function to compile, e.g. ``step(state, batch, rng) -> (state, metrics)``.
      mesh: the mesh.
      in_shardings: one sharding tree (or prefix) per positional argument.
      out_shardings: a sharding tree (or prefix) for the output.
      donate_argnums: arguments whose buffers the output may reuse (the state).

    Returns:
      The compiled callable; ``.lower(*args)`` is exposed for inspection.
    """
    jitted = jax.jit(
        fn,
        in_shardings=_as_sharding(mesh, in_shardings),
        out_shardings=_as_sharding(mesh, out_shardings),
        donate_argnums=donate_argnums,
    )

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(mesh):
            return jitted(*args, **kwargs)

    def lower(*args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(mesh):
            return jitted.lower(*args, **kwargs)

    run.lower = lower  # type: ignore[attr-defined]
    return run


def abstract_arrays(arrays: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` s with concrete shardings: a restore target for orbax.

    Use it to restore a checkpoint onto a mesh other than the one it was saved from:
    ``ocp.args.StandardRestore(abstract_arrays(abstract_state, target_shardings))``.

    Args:
      arrays: a tree of arrays or ``jax.ShapeDtypeStruct`` s (e.g. from
        ``jax.eval_shape``); only shapes and dtypes are read.
      shardings: a tree of ``NamedSharding`` s on a concrete ``Mesh`` mirroring
        ``arrays``.

    Returns:
      A tree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.

    Raises:
      TypeError: a sharding is on an ``AbstractMesh`` (as ``nnx.eval_shape`` under
        ``jax.set_mesh`` gives); orbax needs the concrete mesh.
    """

    def abstract(array: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, AbstractMesh):
            raise TypeError(
                "restore targets need NamedSharding on a concrete Mesh, got one on an "
                "AbstractMesh; rebuild it as NamedSharding(mesh, sharding.spec)"
            )
        return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)

    return jax.tree.map(abstract, arrays, shardings)
