import numpy as np
import pytest

from kdjax.losses import pixel_kd
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import pixel_kd_ref


def make_inputs(rng, batch, size=(3, 4), classes=5):
    shape = (batch, *size, classes)
    return {
        "student_logits": rng.normal(0, 2, shape),
        "teacher_logits": rng.normal(0, 2, shape),
        "mask": rng.random(shape[:3]) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher_logits": inputs["student_logits"].copy()}


class TestPixelKDContract(LossContract):
    case = LossCase(loss=pixel_kd, make_inputs=make_inputs, student=("student_logits",),
                    teacher=("teacher_logits",), options={"temperature": 2.0},
                    identical=same_teacher)


@pytest.mark.parametrize("normalize", ["pixel_mean", "element_mean"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(normalize, temperature, masked):
    inputs = make_inputs(np.random.default_rng(1), 2)
    if not masked:
        inputs.pop("mask")
    assert_matches_reference(pixel_kd, pixel_kd_ref.pixel_kd, inputs, ("student_logits",),
                             temperature=temperature, normalize=normalize)


def test_element_mean_is_pixel_mean_over_classes_without_t_squared():
    arrays = to_jax(make_inputs(np.random.default_rng(2), 2))
    t = 3.0
    pixel = pixel_kd(arrays["student_logits"], arrays["teacher_logits"], temperature=t)
    element = pixel_kd(arrays["student_logits"], arrays["teacher_logits"], temperature=t,
                       normalize="element_mean")
    np.testing.assert_allclose(float(element), float(pixel) / t**2 / 5, rtol=1e-6)


def test_is_non_negative_and_shift_invariant():
    inputs = make_inputs(np.random.default_rng(3), 2)
    arrays = to_jax(inputs)
    value = pixel_kd(arrays["student_logits"], arrays["teacher_logits"])
    shifted = pixel_kd(arrays["student_logits"] + 7.0, arrays["teacher_logits"] - 3.0)
    assert float(value) > 0
    np.testing.assert_allclose(float(value), float(shifted), rtol=1e-5)


@pytest.mark.torch
def test_matches_pytorch_formula():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs = make_inputs(np.random.default_rng(4), 2)
    s = torch.from_numpy(inputs["student_logits"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(inputs["teacher_logits"]).permute(0, 3, 1, 2)
    temp = 2.0
    n, k, h, w = s.shape
    # CIRKD losses/kd.py: rows of K classes, 'batchmean' KL, times T².
    rows_s = s.permute(0, 2, 3, 1).reshape(-1, k)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, k)
    cirkd = F.kl_div(F.log_softmax(rows_s / temp, 1), F.softmax(rows_t / temp, 1),
                     reduction="batchmean") * temp**2
    # TorchDistiller CriterionKD: nn.KLDivLoss() mean over every element, no T².
    distiller = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="mean")
    arrays = to_jax(inputs)
    got = pixel_kd(arrays["student_logits"], arrays["teacher_logits"], temperature=temp)
    got_el = pixel_kd(arrays["student_logits"], arrays["teacher_logits"], temperature=temp,
                      normalize="element_mean")
    np.testing.assert_allclose(float(got), cirkd.item(), rtol=1e-5)
    np.testing.assert_allclose(float(got_el), distiller.item(), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"normalize": "sum"}, "normalize"),
    ({"temperature": 0.0}, "temperature"),
])
def test_bad_options_raise(kwargs, message):
    arrays = to_jax(make_inputs(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match=message):
        pixel_kd(arrays["student_logits"], arrays["teacher_logits"], **kwargs)


def test_shape_mismatch_names_both_shapes():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 5\) and \(1, 3, 4, 4\)"):
        pixel_kd(arrays["student_logits"], arrays["teacher_logits"][..., :4])
    with pytest.raises(ValueError, match="rank 4"):
        pixel_kd(arrays["student_logits"][0], arrays["teacher_logits"][0])
