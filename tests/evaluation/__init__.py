"""Tests of kdjax.evaluation.loop, kdjax.evaluation and kdjax.evaluation.report."""

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tests.devices import skip_unless_devices

# Both kinds of mesh a trainer may build: XLA-propagated (Auto) and sharding-in-types (Explicit,
# the default of jax.make_mesh since JAX 0.8).
MESH_AXIS_TYPES = (AxisType.Auto, AxisType.Explicit)


def batch_sharding(axis_type: AxisType) -> NamedSharding:
    """Leading axis split over a ('data',) mesh of eight devices (the CPU run simulates them); the
    test is skipped where fewer exist."""
    skip_unless_devices(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    return NamedSharding(mesh, PartitionSpec("data"))
