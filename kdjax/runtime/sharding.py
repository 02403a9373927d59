"""Device mesh, shardings and host-local → global batches.

kdjax is data-parallel over one mesh axis ``'data'`` that spans every device of every process.
Batches are sharded along their first axis, parameters and optimizer state are replicated, and
``jax.jit`` with explicit shardings does the rest (no ``pmap``). Under this global view BatchNorm
statistics are those of the global batch (synchronised BN).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def placed(tree, sharding: NamedSharding):
    """``tree``'s leaves (arrays or ``jax.ShapeDtypeStruct``) as ``ShapeDtypeStruct`` carrying
    ``sharding``: the target of a restore or the abstract argument of a compilation."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f"the global batch size {global_batch_size} must be a multiple of the number of devices "
            f"({devices}); set train.batch_size (and eval.batch_size) to a multiple of {devices}.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's share of a batch into global arrays sharded over ``'data'``.

    Every process passes its own rows (``global_batch_size / process_count`` of them); the result
    has the global batch size on every process.
    """
    sharding = batch_sharded(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


def device_batches(local_batches: Iterator[dict], mesh: Mesh, *,
                   ahead: int = 1) -> Iterator[dict[str, jax.Array]]:
    """Global batches from this process's local ones, with ``ahead`` more already sent to the
    devices: a transfer starts when its batch is assembled (JAX copies asynchronously), so the
    next batch travels while the current step runs."""
    queue = collections.deque()
    for local in local_batches:
        queue.append(global_batch(local, mesh))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
