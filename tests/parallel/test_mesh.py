import types

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from rlhf_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ((2, 2, 2), (2, 2, 2)),
        ((1, -1, 1), (1, 8, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((-1, 1, 4), (2, 1, 4)),
        ({"tensor": 2, "fsdp": -1}, (1, 4, 2)),
        (ml_collections.ConfigDict({"data": 8}), (8, 1, 1)),
    ],
)
def test_mesh_shape_fills_the_minus_one_axis(spec, expected):
    assert mesh_lib.mesh_shape(spec, 8) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ((3, -1, 1), r"cannot fill mesh axis 'fsdp'.*data=3, fsdp=-1, tensor=1.*8 devices"),
        ((2, 2, 1), r"data=2, fsdp=2, tensor=1 multiply to 4, but there are 8 devices"),
        ((-1, -1, 2), r"\['data', 'fsdp'\] are all -1"),
        ((0, -1, 1), r"mesh axis 'data' has size 0"),
        ({"model": 8}, r"unknown mesh axes \['model'\]"),
        ((8, 1), r"one size per mesh axis"),
    ],
)
def test_mesh_shape_errors_name_the_axis_and_sizes(spec, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.mesh_shape(spec, 8)


def test_make_mesh_uses_auto_axes_and_keeps_cpu_device_order():
    mesh = mesh_lib.make_mesh((2, -1, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    # On CPU the grid is jax.devices() in order: 'tensor' neighbours are consecutive ids.
    assert list(mesh.devices.flat) == jax.devices()


def test_make_mesh_over_local_devices_and_a_device_subset():
    assert mesh_lib.make_mesh(local_only=True).devices.size == jax.local_device_count()
    small = mesh_lib.make_mesh((1, 1, -1), devices=jax.devices()[:2])
    assert dict(small.shape) == {"data": 1, "fsdp": 1, "tensor": 2}


def _fake_devices(num_slices, per_slice):
    # Slices listed interleaved, to check the grid regroups them by slice.
    return [
        types.SimpleNamespace(
            id=i,
            slice_index=i % num_slices,
            process_index=i % num_slices,
            platform="cpu",
            device_kind="cpu",
        )
        for i in range(num_slices * per_slice)
    ]


def test_multi_slice_grid_puts_slices_along_data():
    grid = mesh_lib.device_grid((4, 2, 1), _fake_devices(num_slices=2, per_slice=4))
    assert grid.shape == (4, 2, 1)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # Each half of the data axis is one slice: fsdp/tensor collectives never cross slices.
    assert (slice_of[:2] == slice_of[0, 0, 0]).all()
    assert (slice_of[2:] == slice_of[2, 0, 0]).all()
    assert slice_of[0, 0, 0] != slice_of[2, 0, 0]


def test_multi_slice_grid_requires_data_to_cover_the_slices():
    with pytest.raises(ValueError, match=r"'data' has size 1.*2 TPU slices"):
        mesh_lib.device_grid((1, 8, 1), _fake_devices(num_slices=2, per_slice=4))
