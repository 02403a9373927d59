"""A convolution's value and gradients with the batch sharded over every device, against one
device: the check that the CPU and GPU forms' tests share."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.devices import skip_unless_devices


def sharded_and_one_device(conv, image_shape, kernel_shape, seed=7):
    """``(value, (dx, dK))`` of ``Σ conv(x, K)²`` with x one (H, W, C_in) image of ``image_shape``
    per device, sharded over a ``'data'`` mesh of every device and K (``kernel_shape``)
    replicated; then the same computed on one device. Skips with fewer than two devices."""
    skip_unless_devices(2)
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((devices.size, *image_shape)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)

    def value_and_grads(x, k):
        return jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1))(x, k)

    sharded = jax.jit(value_and_grads, in_shardings=(
        NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())))
    return sharded(x, kernel), jax.jit(value_and_grads)(x, kernel)
