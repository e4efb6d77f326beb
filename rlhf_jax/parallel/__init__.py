"""Device meshes, logical-axis sharding rules and multi-host initialisation.

One mesh with axes ``('data', 'fsdp', 'tensor')`` (``AxisType.Auto`` on every axis)
serves every run, from one CPU to a TPU pod: the model names its parameter axes
logically, rules map those names to mesh axes, and steps are jitted with explicit
``in_shardings`` / ``out_shardings``.

Public API:

``mesh``
  ``MESH_AXES``; ``mesh_shape(spec, num_devices)`` (sizes with one ``-1`` filled);
  ``device_grid(sizes, devices)`` (topology-aware device order);
  ``make_mesh(spec=(1, -1, 1), *, devices=None, local_only=False)``.
``rules``
  ``DEFAULT_RULES``, ``BATCH_AXES``, ``DroppedAxis``; ``mesh_axes_for(logical, rules)``;
  ``resolve_spec(logical_spec, shape, mesh_axis_sizes, rules)``;
  ``logical_to_mesh_specs(logical_specs, arrays, mesh, rules)``;
  ``logical_to_shardings(logical_specs, arrays, mesh, rules)``.
``sharding``
  ``replicated(mesh)``; ``param_shardings(params, mesh, rules)``;
  ``shard_params(params, mesh, rules)``;
  ``optimizer_state_shardings(tx, params, param_shardings)``; ``batch_spec(ndim)``;
  ``batch_shardings(batch, mesh)``;
  ``jit_sharded(fn, mesh, in_shardings, out_shardings, donate_argnums)``;
  ``abstract_arrays(arrays, shardings)`` (orbax restore targets on any mesh).
``multihost``
  ``DistributedSettings``; ``distributed_settings(config, environ)``;
  ``initialize_from_env(config, environ)``;
  ``process_rows(global_batch_size, mesh, spec)``; ``local_rows(global_batch, mesh, spec)``;
  ``make_global_array(local_batch, mesh, spec)``.
``steps`` (any pure step or the sampler over a mesh; the step builders take no mesh)
  ``state_shardings(state, tx, mesh, rules, extra_rules)``; ``place(tree, shardings)``;
  ``place_batch(batch, mesh)``; ``ShardedStep``;
  ``shard_step(step_fn, mesh, state, example_batch, *, tx, rules, extra_rules)``;
  ``sharded_sampler(graphdef, config, mesh, params_shardings)``.
"""

from rlhf_jax.parallel.mesh import MESH_AXES, device_grid, make_mesh, mesh_shape
from rlhf_jax.parallel.multihost import (
    DistributedSettings,
    distributed_settings,
    initialize_from_env,
    local_rows,
    make_global_array,
    process_rows,
)
from rlhf_jax.parallel.rules import (
    BATCH_AXES,
    DEFAULT_RULES,
    DroppedAxis,
    LogicalRules,
    logical_to_mesh_specs,
    logical_to_shardings,
    mesh_axes_for,
    resolve_spec,
)
from rlhf_jax.parallel.sharding import (
    abstract_arrays,
    batch_shardings,
    batch_spec,
    jit_sharded,
    optimizer_state_shardings,
    param_shardings,
    replicated,
    shard_params,
)
from rlhf_jax.parallel.steps import (
    ShardedStep,
    place,
    place_batch,
    shard_step,
    sharded_sampler,
    state_shardings,
)

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "DistributedSettings",
    "DroppedAxis",
    "LogicalRules",
    "ShardedStep",
    "abstract_arrays",
    "batch_shardings",
    "batch_spec",
    "device_grid",
    "distributed_settings",
    "initialize_from_env",
    "jit_sharded",
    "local_rows",
    "logical_to_mesh_specs",
    "logical_to_shardings",
    "make_global_array",
    "make_mesh",
    "mesh_axes_for",
    "mesh_shape",
    "optimizer_state_shardings",
    "param_shardings",
    "place",
    "place_batch",
    "process_rows",
    "replicated",
    "resolve_spec",
    "shard_params",
    "shard_step",
    "sharded_sampler",
    "state_shardings",
]
