"""Multi-host start-up and per-host data feeding.

A multi-host job runs one Python process per host (TPU VM worker, GPU node, or one per
GPU). Every process runs the same program; ``jax.distributed.initialize`` connects them
through a coordinator so that ``jax.devices()`` lists every process's devices and one
global mesh spans them all.

Settings come, in this order of precedence, from the run config (keys
``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids``,
``auto_detect``), then from the environment:

=================================  ====================================================
``RLHF_JAX_COORDINATOR``           ``host:port`` of process 0 (falls back to JAX's own
                                   ``JAX_COORDINATOR_ADDRESS``)
``RLHF_JAX_NUM_PROCESSES``         number of processes
``RLHF_JAX_PROCESS_ID``            this process's rank, ``0 <= id < num_processes``
``RLHF_JAX_LOCAL_DEVICE_IDS``      comma-separated local accelerators this process
                                   drives (falls back to ``JAX_LOCAL_DEVICE_IDS``)
``RLHF_JAX_AUTO_DETECT=1``         let JAX detect everything itself (Cloud TPU pod
                                   slices, SLURM, Open MPI, Kubernetes)
=================================  ====================================================

With none of these (or one process) initialisation is a no-op: a single-host run needs
no coordinator.

CPU devices of different processes talk through gloo, the default of
``jax_cpu_collectives_implementation`` in jax 0.10: cross-process CPU collectives work
without configuration (the two-process test of this module runs them). Were the default
ever ``"none"``, set ``jax.config.update("jax_cpu_collectives_implementation", "gloo")``
before initialising.

Data: each process loads only the rows of the global batch that its own devices hold and
:func:`make_global_array` assembles the global ``jax.Array`` from them
(``jax.make_array_from_process_local_data``). :func:`process_rows` says which rows those
are, computed from the sharding itself so that it is right for any mesh layout (for the
usual process-major device order it is the ``process_index``-th contiguous block).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel.sharding import batch_spec

LOGGER = logging.getLogger(__name__)

ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "RLHF_JAX_LOCAL_DEVICE_IDS"
ENV_AUTO_DETECT = "RLHF_JAX_AUTO_DETECT"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Arguments for ``jax.distributed.initialize``.

    Attributes:
      coordinator_address: ``host:port`` of process 0; ``None`` with ``auto_detect``.
      num_processes: number of processes; ``None`` with ``auto_detect``.
      process_id: this process's rank; ``None`` with ``auto_detect``.
      local_device_ids: accelerators this process drives, ``None`` for all visible.
      auto_detect: let JAX read the cluster environment (TPU pod, SLURM, MPI, k8s).
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None
    auto_detect: bool = False


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None and value != ""), None)


def _lookup(config: Any, key: str) -> Any:
    if config is None:
        return None
    try:
        return config[key]
    except KeyError:
        return None


def _as_int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}={value!r}: expected an integer") from error


def _device_ids(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split(",")
    elif isinstance(value, int):
        value = [value]
    return tuple(_as_int(name, item) for item in value)  # type: ignore[misc]


def distributed_settings(
    config: Any = None, environ: Mapping[str, str] | None = None
) -> DistributedSettings | None:
    """Resolve multi-host settings from a config and the environment.

    Args:
      config: a ``ConfigDict``, mapping or ``None``; its keys ``coordinator_address``,
        ``num_processes``, ``process_id``, ``local_device_ids``, ``auto_detect`` override
        the environment.
      environ: the environment (default ``os.environ``); see the module docstring.

    Returns:
      The settings, or ``None`` for a single-process run (nothing set, or one process).

    Raises:
      ValueError: the settings are incomplete (e.g. a process count without a
        coordinator) or inconsistent; the message names the key or variable.
    """
    environ = os.environ if environ is None else environ
    auto_detect = _first(_lookup(config, "auto_detect"), environ.get(ENV_AUTO_DETECT))
    if auto_detect not in (None, False, 0, "0", "false", "False"):
        return DistributedSettings(None, None, None, auto_detect=True)
    coordinator = _first(
        _lookup(config, "coordinator_address"),
        environ.get(ENV_COORDINATOR),
        environ.get("JAX_COORDINATOR_ADDRESS"),
    )
    num_processes = _as_int(
        "num_processes", _first(_lookup(config, "num_processes"), environ.get(ENV_NUM_PROCESSES))
    )
    process_id = _as_int(
        "process_id", _first(_lookup(config, "process_id"), environ.get(ENV_PROCESS_ID))
    )
    local_device_ids = _device_ids(
        "local_device_ids",
        _first(
            _lookup(config, "local_device_ids"),
            environ.get(ENV_LOCAL_DEVICE_IDS),
            environ.get("JAX_LOCAL_DEVICE_IDS"),
        ),
    )
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(
                f"process_id={process_id} but num_processes is {num_processes} "
                f"(set num_processes / {ENV_NUM_PROCESSES})"
            )
        return None
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: expected a positive integer")
    if coordinator is None:
        raise ValueError(
            f"num_processes={num_processes} needs coordinator_address / {ENV_COORDINATOR} "
            "(host:port of process 0)"
        )
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} (or {ENV_PROCESS_ID}) must be set and in [0, {num_processes})"
        )
    return DistributedSettings(coordinator, num_processes, process_id, local_device_ids)


def initialize_from_env(
    config: Any = None, environ: Mapping[str, str] | None = None
) -> DistributedSettings | None:
    """Call ``jax.distributed.initialize`` when the job has several processes.

    Must run before anything touches a JAX device. A no-op (returning ``None``) for a
    single process, or when the distributed runtime is already initialised.

    Args:
      config: see :func:`distributed_settings`.
      environ: see :func:`distributed_settings`.

    Returns:
      The settings used, or ``None`` when nothing was initialised.
    """
    settings = distributed_settings(config, environ)
    if settings is None or jax.distributed.is_initialized():
        return None
    if settings.auto_detect:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=settings.local_device_ids,
        )
    LOGGER.info(
        "process %d of %d: %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return settings


def process_rows(
    global_batch_size: int,
    mesh: Mesh,
    spec: PartitionSpec | None = None,
    *,
    process_index: int | None = None,
) -> slice:
    """Rows of the global batch that one process's devices hold.

    Args:
      global_batch_size: rows in the global batch.
      mesh: the global mesh.
      spec: the batch's ``PartitionSpec`` (default: leading axis over
        ``('data', 'fsdp')``).
      process_index: the process (default ``jax.process_index()``).

    Returns:
      ``slice(start, stop)``; with process-major device order and the default spec this
      is ``process_index * B / P`` to ``(process_index + 1) * B / P``. When the batch axis
      is not split across processes (e.g. a pure tensor-parallel mesh) it is every row.

    Raises:
      ValueError: the process holds a non-contiguous set of rows (a device order that
        interleaves processes along the batch axes); the rows could not be fed as one
        block.
    """
    process_index = jax.process_index() if process_index is None else process_index
    spec = batch_spec() if spec is None else spec
    sharding = NamedSharding(mesh, spec)
    index_map = sharding.devices_indices_map((global_batch_size,))
    rows: set[int] = set()
    for device, index in index_map.items():
        if device.process_index == process_index:
            rows.update(range(global_batch_size)[index[0]])
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(
            f"process {process_index} holds rows {sorted(rows)} of the batch, which are not "
            "contiguous; build the mesh with make_mesh (process-major device order)"
        )
    return slice(start, stop)


def local_rows(global_batch: Any, mesh: Mesh, spec: PartitionSpec | None = None) -> Any:
    """This process's rows of every leaf of a host-side global batch (see :func:`process_rows`)."""
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(global_batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}")
    rows = process_rows(sizes.pop(), mesh, spec)
    return jax.tree.map(lambda leaf: np.asarray(leaf)[rows], global_batch)


def make_global_array(local_batch: Any, mesh: Mesh, spec: PartitionSpec | None = None) -> Any:
    """Assemble global ``jax.Array`` s from each process's rows.

    Every process calls this with its own rows (:func:`local_rows`); the result is one
    global array per leaf, sharded by ``NamedSharding(mesh, spec)``.

    Args:
      local_batch: a tree of host arrays holding this process's rows.
      mesh: the global mesh.
      spec: the ``PartitionSpec`` of every leaf (default: leading axis over
        ``('data', 'fsdp')``).

    Returns:
      A tree of global ``jax.Array`` s; the leading size is the sum over processes.
    """
    sharding = NamedSharding(mesh, batch_spec() if spec is None else spec)
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
        local_batch,
    )
