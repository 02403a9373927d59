"""``kdjax.losses._derivative_rules``: the two combinators behind the losses' own derivative rules,
held to plain autodiff of the same formulas on small problems (float64 and float32), with
constant arguments, a vector value, and under ``jit`` and ``vmap``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses._derivative_rules import backward_from_residuals, gradient_from_forward


def problem(dtype, seed=0):
    """x (4, 3), w (3, 2), a teacher t (4, 2), a bool mask (4, 2) and an int array (4,)."""
    rng = np.random.default_rng(seed)
    x, w, t = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((4, 3), (3, 2), (4, 2)))
    return x, w, t, jnp.asarray(rng.random((4, 2)) > 0.3), jnp.arange(4)


# ---- A scalar value: Σ_masked (x·w − t)² · (1 + index), differentiable in x and w. ----

def masked_squares(x, w, t, mask, index):
    weight = (1 + index)[:, None].astype(x.dtype)
    return jnp.sum(jnp.where(mask, jnp.square(x @ w - t), 0.0) * weight)


def masked_squares_parts(x, w, t, mask, index):
    weight = (1 + index)[:, None].astype(x.dtype)
    residual = jnp.where(mask, x @ w - t, 0.0)
    value = jnp.sum(jnp.square(residual) * weight)
    d = 2.0 * residual * weight
    return value, (d @ w.T, x.T @ d, None, None, None)


def with_dtype(dtype, fn):
    if dtype == jnp.float64:
        with jax.enable_x64():
            return fn()
    return fn()


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_scalar_value_and_gradient_match_autodiff(dtype):
    def check():
        args = problem(dtype)
        rule = gradient_from_forward(masked_squares_parts)
        tolerance = 1e-12 if dtype == jnp.float64 else 1e-5
        np.testing.assert_allclose(rule(*args), masked_squares(*args), rtol=tolerance)
        value, grads = jax.value_and_grad(rule, argnums=(0, 1, 2))(*args)
        want_value, want = jax.value_and_grad(masked_squares, argnums=(0, 1, 2))(*args)
        np.testing.assert_allclose(value, want_value, rtol=tolerance)
        for got, expected, arg in zip(grads, want, args):
            assert got.dtype == arg.dtype and got.shape == arg.shape
        np.testing.assert_allclose(grads[0], want[0], rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(grads[1], want[1], rtol=tolerance, atol=tolerance)
        # The teacher is a constant to the rule: its None gradient is a zero cotangent.
        assert not np.any(np.asarray(grads[2]))
        assert np.any(np.asarray(want[2]))

    with_dtype(dtype, check)


def test_the_cotangent_scales_the_stored_gradients():
    args = problem(jnp.float32)
    rule = gradient_from_forward(masked_squares_parts)
    _, pull = jax.vjp(lambda x, w: rule(x, w, *args[2:]), *args[:2])
    _, want_pull = jax.vjp(lambda x, w: masked_squares(x, w, *args[2:]), *args[:2])
    cotangent = jnp.float32(-2.5)
    for got, want in zip(pull(cotangent), want_pull(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_under_jit_and_vmap():
    x, w, t, mask, index = problem(jnp.float32)
    xs = jnp.stack([x, 2.0 * x, -x])
    rule = gradient_from_forward(masked_squares_parts)

    def gradients(fn):
        per_x = jax.grad(lambda x: fn(x, w, t, mask, index))
        return jax.jit(jax.vmap(per_x))(xs)

    np.testing.assert_allclose(gradients(rule), gradients(masked_squares), rtol=1e-5, atol=1e-5)
    values = jax.jit(jax.vmap(lambda x: rule(x, w, t, mask, index)))(xs)
    np.testing.assert_allclose(values, jax.vmap(lambda x: masked_squares(x, w, t, mask, index))(xs),
                               rtol=1e-6)


# ---- A vector value (X,) = (Σ sin(x)·t, Σ x², Σ x·s) with gradients (X, *x.shape). ----

def three_sums(x, t, sets):
    (s,) = sets
    return jnp.stack([jnp.sum(jnp.sin(x) * t), jnp.sum(jnp.square(x)), jnp.sum(x * s)])


def three_sums_parts(x, t, sets):
    (s,) = sets
    return three_sums(x, t, sets), (jnp.stack([jnp.cos(x) * t, 2.0 * x, s]), None, None)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_vector_value_contracts_the_leading_axes(dtype):
    def check():
        rng = np.random.default_rng(1)
        x, t, s = (jnp.asarray(rng.normal(size=(4, 3)), dtype) for _ in range(3))
        rule = gradient_from_forward(three_sums_parts)
        tolerance = 1e-12 if dtype == jnp.float64 else 1e-5
        cotangent = jnp.asarray([0.5, -1.0, 3.0], dtype)
        value, pull = jax.vjp(lambda x: rule(x, t, (s,)), x)
        want_value, want_pull = jax.vjp(lambda x: three_sums(x, t, (s,)), x)
        np.testing.assert_allclose(value, want_value, rtol=tolerance)
        (got,), (want,) = pull(cotangent), want_pull(cotangent)
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        # Every row of the Jacobian (jacrev vmaps the backward over the cotangents).
        np.testing.assert_allclose(jax.jit(jax.jacrev(rule))(x, t, (s,)),
                                   jax.jacrev(three_sums)(x, t, (s,)), rtol=tolerance,
                                   atol=tolerance)

    with_dtype(dtype, check)


def test_the_value_path_forms_no_gradient_and_the_forward_pass_does():
    traced = []

    def value(x, t, sets):
        traced.append("value")
        return three_sums(x, t, sets)

    def parts(x, t, sets):
        traced.append("parts")
        return three_sums_parts(x, t, sets)

    rule = gradient_from_forward(parts, value=value)
    x, t, s = (jnp.full((4, 3), v, jnp.float32) for v in (0.5, 1.0, 2.0))
    jax.jit(rule).lower(x, t, (s,))
    assert traced == ["value"]
    traced.clear()
    jax.jit(jax.grad(lambda x: jnp.sum(rule(x, t, (s,))))).lower(x)
    assert traced == ["parts"]


def test_forward_mode_is_refused():
    args = problem(jnp.float32)
    rule = gradient_from_forward(masked_squares_parts)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: rule(x, *args[1:]), (args[0],), (jnp.ones_like(args[0]),))


@pytest.mark.parametrize("grads, message", [
    (lambda x, w: (2.0 * x,), "one gradient .* per argument"),
    (lambda x, w: (2.0 * x, jnp.ones((3,), jnp.float32)), r"shape value.shape \+ arg.shape"),
    (lambda x, w: (2.0 * x, jnp.ones(w.shape, jnp.int32)), "dtype float32"),
])
def test_misaligned_gradients_are_refused(grads, message):
    def parts(x, w):
        return jnp.sum(x) * jnp.sum(w), grads(x, w)

    rule = gradient_from_forward(parts)
    x, w = jnp.ones((2,), jnp.float32), jnp.ones((3, 2), jnp.float32)
    rule(x, w)  # the value alone checks nothing
    with pytest.raises(ValueError, match=message):
        jax.grad(rule)(x, w)


# ---- backward_from_residuals: Σ_valid (x − mean(x))² · t from the centred values alone. ----

def centred_squares(x, t, valid):
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.sum(valid)
    return jnp.sum(jnp.where(valid, jnp.square(x - mean) * t, 0.0))


def centred_squares_forward(x, t, valid):
    count = jnp.sum(valid)
    centred = jnp.where(valid, x - jnp.sum(jnp.where(valid, x, 0.0)) / count, 0.0)
    value = jnp.sum(jnp.square(centred) * t)
    return value, (centred, t, valid, count)


def centred_squares_backward(residuals, cotangent):
    centred, t, valid, count = residuals
    d = jnp.where(valid, 2.0 * centred * t, 0.0)
    return jnp.where(valid, cotangent * (d - jnp.sum(d) / count), 0.0), None, None


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_backward_from_residuals_matches_autodiff(dtype):
    def check():
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(size=(5, 3)), dtype)
        t = jnp.asarray(rng.random((5, 3)), dtype)
        valid = jnp.asarray(rng.random((5, 3)) > 0.3)
        rule = backward_from_residuals(centred_squares_forward, centred_squares_backward)
        tolerance = 1e-12 if dtype == jnp.float64 else 1e-5
        value, grad = jax.value_and_grad(rule)(x, t, valid)
        want_value, want = jax.value_and_grad(centred_squares)(x, t, valid)
        np.testing.assert_allclose(value, want_value, rtol=tolerance)
        assert grad.dtype == x.dtype
        np.testing.assert_allclose(grad, want, rtol=tolerance, atol=tolerance)
        # The teacher's None is a zero cotangent.
        assert not np.any(np.asarray(jax.grad(rule, argnums=1)(x, t, valid)))
        xs = jnp.stack([x, 3.0 * x])
        np.testing.assert_allclose(
            jax.jit(jax.vmap(jax.grad(rule), in_axes=(0, None, None)))(xs, t, valid),
            jax.vmap(jax.grad(centred_squares), in_axes=(0, None, None))(xs, t, valid),
            rtol=tolerance, atol=tolerance)

    with_dtype(dtype, check)


def test_backward_from_residuals_is_reverse_mode_only():
    rule = backward_from_residuals(centred_squares_forward, centred_squares_backward)
    x, t, valid = jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3), bool)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: rule(x, t, valid), (x,), (x,))
