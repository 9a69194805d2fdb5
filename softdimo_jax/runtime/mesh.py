"""Device meshes and shardings shared by every phase.

One 2-D mesh with axes ("data", "fsdp"): the batch is split over both axes; with FSDP on,
large parameter matrices are additionally split along "fsdp". Data parallel is the
special case fsdp=1.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(num_devices: int | None = None, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over the first `num_devices` devices (default: all).

    Axes are `Auto`: `jax.make_mesh` defaults to `Explicit` axes, which make shardings part
    of array types (sharding-in-types) and reject ops such as gathers over a sharded batch;
    our steps instead place inputs/outputs with NamedShardings and let XLA propagate.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices in (None, 0, -1) else int(num_devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but JAX sees {len(devices)}")
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the number of devices ({n})")
    return jax.make_mesh(
        (n // fsdp, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:n]
    )


def as_auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with `Auto` axis types (see `make_mesh`)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def check_batch_divisible(batch_size: int, mesh) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
            f"choose a multiple of {mesh.size}"
        )


def shard_batch(tree: Any, mesh) -> Any:
    """Places host arrays on the mesh with the batch axis sharded."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)


def fsdp_sharding(mesh, shape: tuple[int, ...], min_size: int = 2**18) -> NamedSharding:
    """Shards the largest axis divisible by the fsdp size; small arrays stay replicated."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def params_shardings(mesh, params_shapes: Any, fsdp: bool) -> Any:
    """Shardings for a params tree (of arrays or ShapeDtypeStructs)."""
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), params_shapes)
    return jax.tree.map(lambda x: fsdp_sharding(mesh, tuple(x.shape)), params_shapes)


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of each array onto its sharding; a ShapeDtypeStruct leaf instead gets
    the sharding attached, so the same construction code builds a real run or the abstract
    one `python -m softdimo_jax.aot` compiles for a TPU topology without allocating."""
    def one(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (the restore target orbax needs)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
