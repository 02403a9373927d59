"""``kdjax.ops.reductions``: several sums along one axis and a masked mean squared difference,
the same in their CPU forms (``kdjax.ops.cpu.reductions``: one pass, written-out derivatives) and
their plain ones, in value, gradient, forward mode and under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.ops import kernels
from kdjax.ops.cpu.reductions import _BLOCK
from kdjax.ops.cpu.reductions import sums as cpu_sums
from kdjax.ops.reductions import mean_squared_difference, sums


@pytest.fixture(params=["cpu", "plain"], autouse=True)
def forms(request, monkeypatch):
    """Every test runs with each form of the reductions."""
    monkeypatch.setattr(kernels, "cpu_forms", lambda: request.param == "cpu")
    return request.param


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
    # The CPU form: a size the block divides takes one pass over the blocks' entries, then a sum
    # of the block sums per operand; one it does not divide, one reduction per operand.
    xs = operands((2, size, 5))
    weights = operands((2, 5), seed=1)
    for x, out in zip(xs, sums(*xs, axis=1), strict=True):
        np.testing.assert_allclose(out, np.sum(np.float64(x), axis=1), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *xs: weighted_total(sums(*xs, axis=1), weights),
                     argnums=(0, 1, 2))(*xs)
    for g, w in zip(grads, weights, strict=True):
        np.testing.assert_array_equal(g, np.broadcast_to(np.expand_dims(w, 1), g.shape))
    text = jax.jit(lambda *xs: cpu_sums(*xs, axis=1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == reductions, text


def test_the_cpu_form_sums_the_last_axis_in_one_reduction_with_an_output_per_operand():
    xs = operands()
    text = jax.jit(lambda *xs: cpu_sums(*xs, axis=-1)).lower(*xs).as_text()
    assert text.count("stablehlo.reduce") == 1, text
    # Another axis: one reduction per operand (XLA's loop would read that axis strided).
    text = jax.jit(lambda *xs: cpu_sums(*xs, axis=1)).lower(*xs).as_text()
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
    with pytest.raises(ValueError, match="out of range"):
        sums(a, b, axis=3)


def squared_difference_reference(s, t, valid):
    """float64: the value, and the gradient with respect to ``s``."""
    valid = np.ones(s.shape[:-1] + (1,), bool) if valid is None else np.asarray(valid)
    difference = np.where(valid, np.float64(s) - np.float64(t), 0.0)
    count = max(valid.sum() * s.shape[-1], 1)
    return np.sum(difference ** 2) / count, 2.0 * difference / count


@pytest.mark.parametrize("masked", [False, True])
def test_mean_squared_difference_matches_float64_in_value_gradient_and_forward_mode(masked):
    rng = np.random.default_rng(3)
    s, t = (jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((2, 5, 6, 1)) > 0.4) if masked else None
    value, grad = jax.jit(jax.value_and_grad(mean_squared_difference))(s, t, valid)
    want_value, want_grad = squared_difference_reference(s, t, valid)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)
    direction = jnp.asarray(rng.normal(size=s.shape), jnp.float32)
    _, tangent = jax.jvp(lambda s: mean_squared_difference(s, t, valid), (s,), (direction,))
    np.testing.assert_allclose(tangent, np.sum(want_grad * np.float64(direction)), rtol=1e-5)
    batched = jax.vmap(mean_squared_difference, in_axes=(0, 0, None if valid is None else 0))(
        s[:, None], t[:, None], None if valid is None else valid[:, None])
    np.testing.assert_allclose(batched, [squared_difference_reference(
        s[i:i + 1], t[i:i + 1], None if valid is None else valid[i:i + 1])[0] for i in range(2)],
        rtol=1e-6)


def test_mean_squared_difference_leaves_out_masked_non_finite_values_and_empty_masks():
    s = jnp.asarray(np.arange(8.0).reshape(1, 2, 2, 2), jnp.float32)
    t = s.at[0, 0, 0].set(jnp.array([jnp.nan, jnp.inf]))
    valid = jnp.array([[[[False], [True]], [[True], [True]]]])
    value, grad = jax.value_and_grad(mean_squared_difference)(s + 1.0, t, valid)
    # 1 in exact arithmetic; a GPU's float32 reduction rounds it to 1 + 1 ulp.
    assert float(value) == pytest.approx(1.0, rel=1e-6)
    assert np.all(np.isfinite(grad)) and not np.any(grad[0, 0, 0])
    value, grad = jax.value_and_grad(mean_squared_difference)(s, t, jnp.zeros_like(valid))
    assert float(value) == 0.0 and not np.any(grad)
