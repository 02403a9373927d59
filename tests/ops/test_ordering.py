import jax
import jax.numpy as jnp
import numpy as np

from kdjax.ops.cpu import ordering


def test_the_value_is_unchanged_whatever_the_marker():
    value = jnp.asarray(np.random.default_rng(9).standard_normal((2, 3, 4, 5)), jnp.float32)
    for marker in (jnp.full((2, 1, 1, 1), jnp.nan), jnp.asarray([[[[jnp.inf]]]]),
                   -value[:, :1, :1, :1]):
        np.testing.assert_array_equal(jax.jit(ordering.after)(value, marker), value)


def test_the_dependency_survives_compilation():
    """XLA must not fold the zero away: the compiled program still reads the marker's array
    (here through its gradient, which is zero)."""
    def f(value, other):
        return jnp.sum(ordering.after(value, other[:1]))

    text = jax.jit(f).lower(jnp.ones((4,)), jnp.ones((3,))).compile().as_text()
    assert "multiply" in text or "select" in text
    grad = jax.grad(f, argnums=1)(jnp.ones((4,)), jnp.ones((3,)))
    np.testing.assert_array_equal(grad, np.zeros(3))
