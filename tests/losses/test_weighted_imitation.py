import functools

import numpy as np
import pytest

from kdjax.losses.pixel_kd import pixel_kd
from kdjax.losses.weighted_imitation import weighted_pixel_imitation
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import weighted_imitation_ref as ref


def make_inputs(rng, batch, size=(3, 4), classes=5):
    shape = (batch, *size, classes)
    return {
        "student_logits": rng.normal(0, 2, shape),
        "teacher_logits": rng.normal(0, 2, shape),
        "mask": rng.random(shape[:3]) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher_logits": inputs["student_logits"].copy()}


class TestWeightedImitationContract(LossContract):
    case = LossCase(loss=weighted_pixel_imitation, make_inputs=make_inputs,
                    student=("student_logits",), teacher=("teacher_logits",),
                    options={"temperature": 2.0}, identical=same_teacher)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_with_weights_held_constant(temperature, masked):
    inputs = make_inputs(np.random.default_rng(1), 2)
    if not masked:
        inputs.pop("mask")
    gap = ref.pixel_gap(inputs["student_logits"], inputs["teacher_logits"], temperature)
    valid = inputs.get("mask", np.ones(gap.shape, bool))
    frozen = ref.gap_weights(gap, valid)
    reference = functools.partial(ref.weighted_pixel_imitation, weights=frozen)
    assert_matches_reference(weighted_pixel_imitation, reference, inputs, ("student_logits",),
                             temperature=temperature)
    # The frozen-weight reference agrees with the self-weighted one at the evaluation point.
    np.testing.assert_allclose(reference(**inputs, temperature=temperature),
                               ref.weighted_pixel_imitation(**inputs, temperature=temperature))


def test_uniform_weights_reduce_to_pixel_kd():
    arrays = to_jax(make_inputs(np.random.default_rng(2), 2))
    s, t, m = arrays["student_logits"], arrays["teacher_logits"], arrays["mask"]
    uniform = weighted_pixel_imitation(s, t, temperature=2.0, mask=m,
                                       gap_weight=lambda gap, valid: valid)
    np.testing.assert_allclose(float(uniform), float(pixel_kd(s, t, temperature=2.0, mask=m)),
                               rtol=1e-6)


def test_default_weights_average_one_and_favour_larger_gaps():
    arrays = to_jax(make_inputs(np.random.default_rng(3), 2))
    s, t = arrays["student_logits"], arrays["teacher_logits"]
    seen = {}

    def spy(gap, valid):
        from kdjax.losses.weighted_imitation import relative_gap_weight
        seen["gap"], seen["w"] = gap, relative_gap_weight(gap, valid)
        return seen["w"]

    value = weighted_pixel_imitation(s, t, gap_weight=spy)
    w, gap = np.asarray(seen["w"]), np.asarray(seen["gap"])
    np.testing.assert_allclose(w.mean(axis=(1, 2)), 1.0, rtol=1e-5)
    order = np.argsort(gap.reshape(2, -1), axis=1)
    assert np.all(np.diff(np.take_along_axis(w.reshape(2, -1), order, axis=1), axis=1) >= 0)
    # Weighting by the gap itself: the mean of g²/mean(g) is at least the mean gap (Cauchy-Schwarz).
    assert float(value) >= float(pixel_kd(s, t)) - 1e-6


def test_bad_gap_weight_shape_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match="gap_weight"):
        weighted_pixel_imitation(arrays["student_logits"], arrays["teacher_logits"],
                                 gap_weight=lambda g, v: g[0])
