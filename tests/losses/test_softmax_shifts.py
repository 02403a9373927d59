"""``kdjax.losses._common.softmax_shifts``: the stop-gradient maxima of stable softmaxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses._common import softmax_shifts


def operands(shape=(3, 4, 7), count=3, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(count))


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_shifts_match_the_maxima_and_stop_the_gradient(axis):
    xs = operands(count=2)
    for x, out in zip(xs, softmax_shifts(*xs, axis=axis), strict=True):
        np.testing.assert_array_equal(out, np.max(np.asarray(x), axis=axis, keepdims=True))
    grads = jax.grad(lambda a, b: jnp.sum(sum(softmax_shifts(a, b, axis=axis))),
                     argnums=(0, 1))(*xs)
    for g in grads:
        assert not np.any(np.asarray(g))


def test_softmax_shifts_are_one_reduction_per_operand():
    # YNNPACK takes plain maxima one by one faster than XLA's loop takes them together.
    xs = operands()
    text = jax.jit(lambda *xs: softmax_shifts(*xs, axis=-1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == 3, text


def test_softmax_shifts_keep_the_axis_and_replace_a_non_finite_maximum_by_zero():
    x = jnp.array([[1.0, 3.0, 2.0], [-np.inf, -np.inf, -np.inf], [0.0, np.inf, 1.0]])
    for axis in (-1, 0):
        (shift,) = softmax_shifts(x, axis=axis)
        maximum = np.max(np.asarray(x), axis=axis, keepdims=True)
        assert shift.shape == maximum.shape
        np.testing.assert_array_equal(shift, np.where(np.isfinite(maximum), maximum, 0.0))
    shift_x, shift_y = softmax_shifts(x, 2 * x, axis=-1)
    np.testing.assert_array_equal(shift_y, [[6.0], [0.0], [0.0]])
    np.testing.assert_array_equal(shift_x, [[3.0], [0.0], [0.0]])


def test_mismatched_operands_are_rejected():
    a, b = operands(count=2)
    with pytest.raises(ValueError, match="share shape and dtype"):
        softmax_shifts(a, b.astype(jnp.bfloat16), axis=-1)
