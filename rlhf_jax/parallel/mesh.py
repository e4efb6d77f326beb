"""Device meshes over the axes ``('data', 'fsdp', 'tensor')``.

The mesh has three named axes, ordered from the least to the most communication-hungry,
which is the order :func:`jax.experimental.mesh_utils.create_device_mesh` expects so that
the innermost axis lands on the fastest links (neighbouring chips of a TPU torus, the
GPUs of one host):

* ``data``: pure data parallelism; parameters are replicated along it, gradients are
  all-reduced over it. On a multi-slice TPU job the slices (joined by the slower data
  centre network) are laid along this axis.
* ``fsdp``: data parallelism whose parameters and optimizer state are also sharded along
  it (ZeRO-3, Rajbhandari et al., 2020): weights are all-gathered before use and
  gradients reduce-scattered.
* ``tensor``: tensor (model) parallelism inside each layer (Shoeybi et al., 2019).

Sizes come from a config (``ConfigDict`` or ``dict`` with keys ``data``, ``fsdp``,
``tensor``) or a tuple in that order. Their product must equal the device count; at most
one size may be ``-1`` and is then the device count divided by the others.

The mesh is built with ``jax.sharding.AxisType.Auto`` on every axis: training steps are
jitted with explicit ``in_shardings`` / ``out_shardings`` and let XLA's partitioner place
intermediates, without sharding-in-types (``jax.make_mesh`` would default to ``Explicit``
axes, which these steps are not written for).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshShapeLike = Mapping[str, int] | Sequence[int] | Any


def _sizes_from(spec: MeshShapeLike) -> tuple[int, ...]:
    if hasattr(spec, "items"):
        given = dict(spec.items())
        unknown = set(given) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
        return tuple(int(given.get(axis, 1)) for axis in MESH_AXES)
    sizes = tuple(int(size) for size in spec)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape {sizes} must give one size per mesh axis {MESH_AXES}")
    return sizes


def mesh_shape(spec: MeshShapeLike, num_devices: int) -> tuple[int, int, int]:
    """Resolve mesh axis sizes for ``num_devices`` devices.

    Args:
      spec: a tuple ``(data, fsdp, tensor)``, or a mapping / ``ConfigDict`` with any of the
        keys ``data``, ``fsdp``, ``tensor`` (a missing key means size 1). One size may be
        ``-1``: it becomes ``num_devices`` divided by the product of the others.
      num_devices: the number of devices the mesh must cover.

    Returns:
      ``(data, fsdp, tensor)`` with product ``num_devices``.

    Raises:
      ValueError: a size is 0 or below -1, more than one size is -1, the fixed sizes do
        not divide ``num_devices``, or their product is not ``num_devices``; the message
        names the axes and sizes.
    """
    sizes = _sizes_from(spec)
    named = ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {axis!r} has size {size}; sizes are >= 1 or -1 ({named})")
    fill = [axis for axis, size in zip(MESH_AXES, sizes, strict=True) if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh axes {fill} are all -1; at most one axis may be -1 ({named})")
    fixed = math.prod(size for size in sizes if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"cannot fill mesh axis {fill[0]!r}: the other axes ({named}) multiply to "
                f"{fixed}, which does not divide the {num_devices} devices"
            )
        sizes = tuple(num_devices // fixed if size == -1 else size for size in sizes)
    elif fixed != num_devices:
        raise ValueError(
            f"mesh axes {named} multiply to {fixed}, but there are {num_devices} devices; "
            "set one axis to -1 to fill the rest"
        )
    return sizes  # type: ignore[return-value]


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(device, "slice_index", 0) for device in devices})


def device_grid(
    sizes: Sequence[int],
    devices: Sequence[Any],
    *,
    allow_split_physical_axes: bool = False,
) -> np.ndarray:
    """Arrange ``devices`` in an array of shape ``sizes`` with good collective locality.

    One slice (all GPUs, CPUs, or one TPU slice): ``mesh_utils.create_device_mesh``, which
    follows the TPU torus and sorts GPUs by their global id (on CPU it keeps
    ``devices`` order, which is process-major). Several TPU slices:
    ``mesh_utils.create_hybrid_device_mesh`` with the slices along ``data`` (only data
    parallelism crosses the data-centre network), so ``data`` must be a multiple of the
    slice count.

    Args:
      sizes: ``(data, fsdp, tensor)``, product ``len(devices)``.
      devices: the devices to arrange.
      allow_split_physical_axes: let a mesh axis span parts of several physical TPU axes
        when the shape does not fit the torus.

    Returns:
      An object array of devices of shape ``sizes``.

    Raises:
      ValueError: with several slices, ``data`` is not a multiple of the slice count.
    """
    num_slices = _num_slices(devices)
    if num_slices == 1:
        return mesh_utils.create_device_mesh(
            tuple(sizes), devices, allow_split_physical_axes=allow_split_physical_axes
        )
    data, fsdp, tensor = sizes
    if data % num_slices:
        raise ValueError(
            f"mesh axis 'data' has size {data}, which must be a multiple of the "
            f"{num_slices} TPU slices laid along it"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp, tensor),
        (num_slices, 1, 1),
        devices,
        allow_split_physical_axes=allow_split_physical_axes,
    )


def make_mesh(
    spec: MeshShapeLike = (1, -1, 1),
    *,
    devices: Sequence[Any] | None = None,
    local_only: bool = False,
    allow_split_physical_axes: bool = False,
) -> Mesh:
    """Build the ``('data', 'fsdp', 'tensor')`` mesh with ``Auto`` axis types.

    Args:
      spec: axis sizes, see :func:`mesh_shape`; the default puts every device on
        ``fsdp``.
      devices: the devices to use; by default ``jax.devices()`` (every process's
        devices: the global mesh of a multi-host job), or ``jax.local_devices()`` when
        ``local_only``.
      local_only: build the mesh over this process's devices only.
      allow_split_physical_axes: see :func:`device_grid`.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``MESH_AXES`` and ``AxisType.Auto`` axes.
    """
    if devices is None:
        devices = jax.local_devices() if local_only else jax.devices()
    devices = list(devices)
    sizes = mesh_shape(spec, len(devices))
    grid = device_grid(sizes, devices, allow_split_physical_axes=allow_split_physical_axes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
