"""``kdjax.losses._reductions``: several sums along one axis in one pass, and softmax shifts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses._reductions import _BLOCK, softmax_shifts, sums


def operands(shape=(3, 4, 7), count=3, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(count))


def weighted_total(outputs, weights):
    """A scalar that depends on every output with its own weights, so each gradient is distinct."""
    return sum(jnp.sum(w * out) for w, out in zip(weights, outputs))


@pytest.mark.parametrize("axis", [-1, 2, 1, 0])
def test_sums_match_float64_sums_in_value_and_gradient(axis):
    xs = operands()
    reduced = tuple(s for i, s in enumerate(xs[0].shape) if i != axis % 3)
    weights = operands(reduced, seed=1)
    got = sums(*xs, axis=axis)
    for x, out in zip(xs, got, strict=True):
        assert out.shape == reduced and out.dtype == jnp.float32
        np.testing.assert_allclose(out, np.sum(np.float64(x), axis=axis), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda *xs: weighted_total(sums(*xs, axis=axis), weights),
                     argnums=(0, 1, 2))(*xs)
    for g, w in zip(grads, weights, strict=True):
        # d/dx Σ w · sum(x) = w broadcast along the reduced axis.
        np.testing.assert_array_equal(g, np.broadcast_to(np.expand_dims(w, axis), g.shape))


@pytest.mark.parametrize("size, reductions", [(3 * _BLOCK, 4), (3 * _BLOCK + 1, 3)])
def test_sums_along_a_long_inner_axis_in_blocks(size, reductions):
    # A size the block divides: one pass over the blocks' entries, then a sum of the block sums
    # per operand; one it does not divide: one reduction per operand.
    xs = operands((2, size, 5))
    weights = operands((2, 5), seed=1)
    for x, out in zip(xs, sums(*xs, axis=1), strict=True):
        np.testing.assert_allclose(out, np.sum(np.float64(x), axis=1), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *xs: weighted_total(sums(*xs, axis=1), weights),
                     argnums=(0, 1, 2))(*xs)
    for g, w in zip(grads, weights, strict=True):
        np.testing.assert_array_equal(g, np.broadcast_to(np.expand_dims(w, 1), g.shape))
    text = jax.jit(lambda *xs: sums(*xs, axis=1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == reductions, text


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_shifts_match_the_maxima_and_stop_the_gradient(axis):
    xs = operands(count=2)
    for x, out in zip(xs, softmax_shifts(*xs, axis=axis), strict=True):
        np.testing.assert_array_equal(out, np.max(np.asarray(x), axis=axis, keepdims=True))
    grads = jax.grad(lambda a, b: jnp.sum(sum(softmax_shifts(a, b, axis=axis))),
                     argnums=(0, 1))(*xs)
    for g in grads:
        assert not np.any(np.asarray(g))


def test_the_last_axis_is_one_reduction_with_an_output_per_operand():
    xs = operands()
    text = jax.jit(lambda *xs: sums(*xs, axis=-1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == 1, text
    # Another axis: one reduction per operand (XLA's loop would read that axis strided).
    text = jax.jit(lambda *xs: sums(*xs, axis=1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == 3, text


def test_softmax_shifts_are_one_reduction_per_operand():
    # YNNPACK takes plain maxima one by one faster than XLA's loop takes them together.
    xs = operands()
    text = jax.jit(lambda *xs: softmax_shifts(*xs, axis=-1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == 3, text


def test_special_values_propagate_as_in_separate_reductions():
    x = jnp.array([[1.0, np.inf, 2.0], [np.nan, 0.0, 1.0], [-np.inf, -np.inf, -np.inf]])
    y = jnp.ones_like(x)
    for got, want in zip(sums(x, y, axis=-1), (jnp.sum(x, -1), jnp.sum(y, -1))):
        np.testing.assert_array_equal(got, want)


def test_jit_vmap_and_second_order_agree_with_jnp_sum():
    xs = operands((5, 4, 6), count=2)

    def f(a, b):
        s_a, s_b = sums(a * a, a * b, axis=-1)
        return jnp.sum(s_a * s_b)

    def reference(a, b):
        return jnp.sum(jnp.sum(a * a, -1) * jnp.sum(a * b, -1))

    np.testing.assert_allclose(jax.jit(f)(*xs), reference(*xs), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(*xs), jax.vmap(reference)(*xs), rtol=1e-6)
    hessian = jax.hessian(f)(xs[0][0, :1], xs[1][0, :1])
    np.testing.assert_allclose(hessian, jax.hessian(reference)(xs[0][0, :1], xs[1][0, :1]),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_sum_in_their_own_dtype():
    xs = operands(count=2, dtype=jnp.bfloat16)
    for x, out in zip(xs, sums(*xs, axis=-1), strict=True):
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(out), np.sum(np.float32(x), -1), rtol=0.05, atol=0.05)


def test_mismatched_operands_and_axes_are_rejected():
    a, b = operands(count=2)
    with pytest.raises(ValueError, match="share shape and dtype"):
        sums(a, b[:, :2], axis=-1)
    with pytest.raises(ValueError, match="share shape and dtype"):
        softmax_shifts(a, b.astype(jnp.bfloat16), axis=-1)
    with pytest.raises(ValueError, match="out of range"):
        sums(a, b, axis=3)


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
