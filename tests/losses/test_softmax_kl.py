"""``softmax_kl``, the KL shared by pixel KD, WPI and CWD.

The losses freeze the teacher, so their own tests only reach the student side of that backward;
these check both sides, and the masking, against float64 NumPy with central differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses._common import softmax_kl
from tests.losses.contract import assert_matches_reference


def reference_kl(student_z, teacher_z, valid=None, weights=None, axis=1):
    """Σ weights · KL(softmax(teacher_z) || softmax(student_z)) along ``axis`` over ``valid``."""
    valid = np.ones(student_z.shape, bool) if valid is None else np.broadcast_to(valid, student_z.shape)

    def log_softmax(z):
        z = np.where(valid, z, -np.inf)
        top = np.max(z, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        total = np.sum(np.exp(z - top), axis=axis, keepdims=True)
        return z - top - np.log(np.where(total > 0, total, 1.0))

    log_s = np.where(valid, log_softmax(student_z), 0.0)
    log_t = np.where(valid, log_softmax(teacher_z), 0.0)
    kl = np.sum(np.where(valid, np.exp(log_t) * (log_t - log_s), 0.0), axis=axis)
    return float(np.sum(kl if weights is None else weights * kl))


def weighted_kl(student_z, teacher_z, weights, valid=None, axis=1):
    return jnp.sum(weights * softmax_kl(student_z, teacher_z, axis=axis, valid=valid))


def make_inputs(seed=0, shape=(2, 5, 3), axis=1):
    """Logits of ``shape`` and one weight per KL (``shape`` without ``axis``)."""
    rng = np.random.default_rng(seed)
    reduced = tuple(size for i, size in enumerate(shape) if i != axis % len(shape))
    return {"student_z": rng.normal(0, 2, shape), "teacher_z": rng.normal(0, 2, shape),
            "weights": rng.uniform(0.5, 2.0, reduced)}


@pytest.mark.parametrize("axis", [1, -1])
def test_value_and_both_gradients_match_reference(axis):
    inputs = make_inputs(axis=axis)
    assert_matches_reference(weighted_kl, reference_kl, inputs, ("student_z", "teacher_z"),
                             axis=axis)


@pytest.mark.parametrize("axis", [1, -1])
def test_masked_value_and_both_gradients_match_reference(axis):
    # Along the last axis the sums are one reduction (the CPU form of kdjax.ops.reductions): both
    # paths.
    inputs = make_inputs(1, axis=axis)
    valid = np.random.default_rng(2).random((2, 5, 3)) > 0.4
    valid[1] = False           # slices without a valid entry: 0, with zero gradients
    valid[0, 0] = True
    inputs["valid"] = valid
    assert_matches_reference(weighted_kl, reference_kl, inputs, ("student_z", "teacher_z"),
                             axis=axis)


@pytest.mark.parametrize("axis", [1, -1])
def test_non_finite_masked_entries_reach_neither_gradient(axis):
    inputs = make_inputs(3, axis=axis)
    valid = np.ones((2, 5, 3), bool)
    np.moveaxis(valid, axis, 0)[2] = False       # one entry of every slice along ``axis``
    student, teacher = inputs["student_z"].copy(), inputs["teacher_z"].copy()
    student[~valid] = np.nan
    teacher[~valid] = np.inf
    args = [jnp.asarray(x, jnp.float32) for x in (student, teacher, inputs["weights"])]
    value, (d_student, d_teacher) = jax.value_and_grad(weighted_kl, argnums=(0, 1))(
        *args, valid=jnp.asarray(valid), axis=axis)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(d_student)) and np.all(np.isfinite(d_teacher))
    assert np.all(np.asarray(d_student)[~valid] == 0) and np.all(np.asarray(d_teacher)[~valid] == 0)


def test_student_gradient_sums_to_zero_along_the_axis():
    # p^S − p^T: both are distributions, so a shift of every entry of a slice changes nothing.
    args = [jnp.asarray(x, jnp.float32) for x in make_inputs(4).values()]
    d_student = jax.grad(weighted_kl)(*args)
    np.testing.assert_allclose(np.asarray(d_student).sum(axis=1), 0.0, atol=1e-6)


def test_vmap_and_jit_match_direct_call():
    args = [jnp.asarray(x, jnp.float32) for x in make_inputs(5).values()]
    per_image = jax.vmap(jax.grad(lambda s, t, w: weighted_kl(s[None], t[None], w[None]),
                                  argnums=(0, 1)))(*args)
    direct = jax.jit(jax.grad(weighted_kl, argnums=(0, 1)))(*args)
    for a, b in zip(per_image, direct, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [1, -1])
def test_temperature_divides_the_logits(axis):
    # The temperature never forms x/T (the maxima read the raw logits); value and both gradients
    # must still be those of the KL between softmax(x/T) distributions.
    temperature = 4.0
    inputs = make_inputs(5, axis=axis)
    inputs["student_z"] = inputs["student_z"] * 3.0
    inputs["teacher_z"] = inputs["teacher_z"] * 3.0

    def reference(student_z, teacher_z, weights, axis):
        return reference_kl(student_z / temperature, teacher_z / temperature, weights=weights,
                            axis=axis)

    assert_matches_reference(
        lambda student_z, teacher_z, weights, axis: jnp.sum(weights * softmax_kl(
            student_z, teacher_z, axis=axis, temperature=temperature)),
        reference, inputs, ("student_z", "teacher_z"), axis=axis)
