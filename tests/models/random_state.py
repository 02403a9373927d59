"""Models with random weights and BN statistics, and random inputs, drawn by NumPy, for tests.

Eager construction compiles one random-number program per parameter shape, which dominates a CPU
test run; building the structure under ``nnx.eval_shape`` and filling it from NumPy costs no
compilation. Random (not fresh) BN statistics also keep eval mode from being near the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _draw(rng, name, shape, dtype):
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key(int(rng.integers(2**31)))
    if name == "count":  # an rng stream's counter
        return jnp.zeros(shape, dtype)
    if name == "kernel":  # He-normal on fan-in keeps activations of deep ReLU stacks in range
        fan_in = int(np.prod(shape[:-1]))
        value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name == "var":
        value = rng.uniform(0.5, 1.5, shape)
    elif name == "scale":
        value = 1.0 + 0.1 * rng.normal(size=shape)
    elif name == "u":  # a power-iteration vector is a unit vector
        value = rng.normal(size=shape)
        value /= np.linalg.norm(value)
    else:  # biases, running means, attention gains
        value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, dtype)


def random_module(make, seed: int = 0):
    """``make()`` (a zero-argument module constructor) with every variable drawn at random."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return _draw(rng, name, leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def randn(seed: int, *shape: int) -> jax.Array:
    """A float32 array of standard normal draws, reproducible from ``seed``."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
