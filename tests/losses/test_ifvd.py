import numpy as np
import pytest

from kdjax.losses._common import nearest_resize_labels
from kdjax.losses.ifvd import ifvd
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference, grads,
                                   relative_error, to_jax)
from tests.references import ifvd_ref

CLASSES = 4


def make_labels(rng, batch, size, classes=CLASSES):
    labels = rng.integers(0, classes, (batch, *size))
    # Pixels without a prototype: ignore (255), CIRKD's ignore (-1) and a label >= K.
    odd = rng.random(labels.shape)
    labels[odd < 0.1] = 255
    labels[(odd >= 0.1) & (odd < 0.15)] = -1
    labels[(odd >= 0.15) & (odd < 0.2)] = classes + 2
    return labels


def make_inputs(rng, batch, size=(3, 4), label_size=(7, 9), student_channels=3, teacher_channels=5):
    return {
        "student_feat": rng.normal(0, 1, (batch, *size, student_channels)),
        "teacher_feat": rng.normal(0, 1, (batch, *size, teacher_channels)),
        "labels": make_labels(rng, batch, label_size),
        "mask": rng.random((batch, *size)) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher_feat": inputs["student_feat"].copy()}


class TestIfvdContract(LossContract):
    case = LossCase(loss=ifvd, make_inputs=make_inputs, student=("student_feat",),
                    teacher=("teacher_feat",), options={"num_classes": CLASSES},
                    identical=same_teacher)


@pytest.mark.parametrize("label_size", [(3, 4), (7, 9), (5, 10)])
@pytest.mark.parametrize("ignore_label", [255, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(label_size, ignore_label, masked):
    inputs = make_inputs(np.random.default_rng(1), 2, label_size=label_size)
    if masked:
        inputs["mask"][1, 0] = False
    else:
        inputs.pop("mask")
    assert_matches_reference(ifvd, ifvd_ref.ifvd, inputs, ("student_feat",), num_classes=CLASSES,
                             ignore_label=ignore_label)


def test_reference_resize_rule_matches_library_helper():
    # The reference resizes on its own; both must pick the same rows/columns (non-integer ratios).
    labels = np.arange(2 * 13 * 17).reshape(2, 13, 17)
    for size in [(3, 4), (5, 7), (6, 16), (13, 17)]:
        np.testing.assert_array_equal(ifvd_ref.nearest_resize(labels, *size),
                                      np.asarray(nearest_resize_labels(labels, *size)))


def test_invariant_to_global_scale_and_rotation_of_the_student():
    rng = np.random.default_rng(2)
    inputs = make_inputs(rng, 2)
    arrays = to_jax(inputs)
    base = float(ifvd(**arrays, num_classes=CLASSES))
    assert base > 1e-3
    scaled = {**arrays, "student_feat": arrays["student_feat"] * 3.7}
    np.testing.assert_allclose(float(ifvd(**scaled, num_classes=CLASSES)), base, rtol=1e-5)
    # Prototypes are means and cosines are inner products: both commute with an orthogonal map.
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotated = {**arrays, "student_feat": to_jax({"x": inputs["student_feat"] @ q})["x"]}
    np.testing.assert_allclose(float(ifvd(**rotated, num_classes=CLASSES)), base, rtol=1e-5)


def test_not_invariant_to_per_pixel_rescaling():
    # Prototypes average unnormalised features, so rescaling pixels differently moves them.
    rng = np.random.default_rng(3)
    inputs = make_inputs(rng, 2)
    arrays = to_jax(inputs)
    base = float(ifvd(**arrays, num_classes=CLASSES))
    scale = rng.uniform(0.2, 5.0, inputs["student_feat"].shape[:3] + (1,))
    rescaled = to_jax({**inputs, "student_feat": inputs["student_feat"] * scale})
    assert abs(float(ifvd(**rescaled, num_classes=CLASSES)) - base) > 1e-3


def test_pixels_without_class_add_zero_but_count():
    rng = np.random.default_rng(4)
    inputs = make_inputs(rng, 2, label_size=(3, 4))
    inputs.pop("mask")
    inputs["labels"] = np.full_like(inputs["labels"], 255)
    inputs["labels"][0, 0, 0] = 1
    inputs["labels"][0, 0, 1] = 1
    arrays = to_jax(inputs)
    got = float(ifvd(**arrays, num_classes=CLASSES))
    # Only the two class-1 pixels differ from 0; the mean still divides by all N·H·W = 24 pixels.
    cut = {name: value[:1, :1, :2] for name, value in inputs.items()}
    two = float(ifvd(**to_jax(cut), num_classes=CLASSES))
    assert two > 1e-4
    np.testing.assert_allclose(got, two * 2 / 24, rtol=1e-5)


def test_masked_pixels_leave_prototypes_and_gradient():
    rng = np.random.default_rng(5)
    inputs = make_inputs(rng, 2)
    arrays = to_jax(inputs)
    base = float(ifvd(**arrays, num_classes=CLASSES))
    poisoned = {k: v.copy() for k, v in inputs.items()}
    hidden = ~inputs["mask"]
    poisoned["student_feat"][hidden] = np.nan
    poisoned["teacher_feat"][hidden] = 1e6
    arrays_p = to_jax(poisoned)
    np.testing.assert_allclose(float(ifvd(**arrays_p, num_classes=CLASSES)), base, rtol=1e-6)
    case = LossCase(loss=ifvd, make_inputs=None, student=("student_feat",), teacher=(),
                    options={"num_classes": CLASSES})
    g = np.asarray(grads(case, arrays_p, ("student_feat",))["student_feat"])
    assert np.all(np.isfinite(g)) and np.all(g[hidden] == 0)


def test_zero_feature_pixels_have_finite_gradient():
    inputs = make_inputs(np.random.default_rng(6), 2)
    inputs["student_feat"] = np.maximum(inputs["student_feat"], 0)  # ReLU features: some all-zero
    inputs["student_feat"][0, 1, 2] = 0.0
    inputs["student_feat"][1] = 0.0  # a whole image of zeros: zero prototypes as well
    arrays = to_jax(inputs)
    case = LossCase(loss=ifvd, make_inputs=None, student=("student_feat",), teacher=(),
                    options={"num_classes": CLASSES})
    assert np.isfinite(float(ifvd(**arrays, num_classes=CLASSES)))
    g = grads(case, arrays, ("student_feat",))["student_feat"]
    assert np.all(np.isfinite(np.asarray(g)))


def _torch_ifvd(torch, feat_s, feat_t, target, num_classes):
    """The CIRKD/official CriterionIFV formula in NCHW float64 (labels at any resolution)."""
    F = torch.nn.functional
    size = feat_s.shape[2:]
    small = torch.nn.Upsample(size=size, mode="nearest")(target[:, None].double())

    def similarity(feat):
        tar = small.expand(feat.shape)
        centre = feat.clone()
        for k in range(num_classes):
            member = (tar == k).double()
            proto = (member * feat).sum((2, 3)) / (member.sum((2, 3)) + 1e-6)
            centre = (1 - member) * centre + member * proto[:, :, None, None]
        return F.cosine_similarity(feat, centre, dim=1)

    return torch.nn.MSELoss()(similarity(feat_s), similarity(feat_t.detach()))


@pytest.mark.torch
def test_label_resize_matches_torch_upsample_nearest():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    for (h_in, w_in), (h, w) in [((512, 1024), (65, 129)), ((7, 9), (3, 4)), ((14, 10), (6, 4)),
                                 ((97, 131), (13, 17)), ((3, 5), (7, 11)), ((33, 65), (9, 9))]:
        labels = rng.integers(-1, 20, (2, h_in, w_in))
        want = torch.nn.Upsample(size=(h, w), mode="nearest")(
            torch.from_numpy(labels)[:, None].float())[:, 0].long().numpy()
        np.testing.assert_array_equal(np.asarray(nearest_resize_labels(labels, h, w)), want)


@pytest.mark.torch
def test_matches_pytorch_formula_value_and_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    inputs = make_inputs(rng, 2, size=(4, 6), label_size=(9, 13))
    inputs.pop("mask")
    s = torch.from_numpy(inputs["student_feat"]).permute(0, 3, 1, 2).requires_grad_(True)
    t = torch.from_numpy(inputs["teacher_feat"]).permute(0, 3, 1, 2)
    want = _torch_ifvd(torch, s, t, torch.from_numpy(inputs["labels"]), CLASSES)
    want.backward()
    want_grad = s.grad.permute(0, 2, 3, 1).numpy()

    arrays = to_jax(inputs)
    got = ifvd(**arrays, num_classes=CLASSES)
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
    case = LossCase(loss=ifvd, make_inputs=None, student=("student_feat",), teacher=(),
                    options={"num_classes": CLASSES})
    got_grad = grads(case, arrays, ("student_feat",))["student_feat"]
    assert relative_error(got_grad, want_grad) < 1e-5


@pytest.mark.torch
def test_matches_pytorch_formula_with_clamped_norms():
    # PyTorch's cosine clamps each norm at 1e-8: a zero feature and tiny features hit the clamp.
    # Values agree. (Below the clamp torch's autograd is not the derivative of its own forward
    # value; ours is, so gradients are compared on unclamped inputs above.)
    torch = pytest.importorskip("torch")
    inputs = make_inputs(np.random.default_rng(10), 2, size=(4, 6), label_size=(9, 13))
    inputs.pop("mask")
    inputs["student_feat"][0, 0, 0] = 0.0
    inputs["student_feat"][1, 2, 3] *= 1e-10
    inputs["teacher_feat"][0, 1, 1] *= 1e-10
    inputs["teacher_feat"][1, 0, 0] = 0.0
    s = torch.from_numpy(inputs["student_feat"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(inputs["teacher_feat"]).permute(0, 3, 1, 2)
    want = _torch_ifvd(torch, s, t, torch.from_numpy(inputs["labels"]), CLASSES)
    got = ifvd(**to_jax(inputs), num_classes=CLASSES)
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


@pytest.mark.torch
def test_cosine_eps_semantics_match_torch():
    torch = pytest.importorskip("torch")
    from kdjax.losses.ifvd import _cosine
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 5))
    y = rng.normal(size=(6, 5))
    x[0] *= 1e-9
    y[1] *= 1e-9
    x[2] *= 1e-9
    y[2] *= 1e-9
    x[3] = 0.0
    want = torch.nn.functional.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=1)
    got = _cosine(*to_jax({"x": x, "y": y}).values())
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-12)


def test_bad_input_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    s, t, labels = arrays["student_feat"], arrays["teacher_feat"], arrays["labels"]
    with pytest.raises(ValueError, match=r"labels must have rank 3.*\(2, 7, 9, 1\)"):
        ifvd(s, t, labels[..., None], num_classes=CLASSES)
    with pytest.raises(ValueError, match=r"labels and student_feat.*\(1, 7, 9\).*\(2, 3, 4, 3\)"):
        ifvd(s, t, labels[:1], num_classes=CLASSES)
    with pytest.raises(ValueError, match="labels must be an integer"):
        ifvd(s, t, labels.astype(np.float32), num_classes=CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        ifvd(s, t, labels, num_classes=0)
    with pytest.raises(ValueError,
                       match=r"student_feat and teacher_feat.*\(2, 3, 4, 3\).*\(2, 3, 3, 5\)"):
        ifvd(s, t[:, :, :3], labels, num_classes=CLASSES)
    with pytest.raises(ValueError, match="teacher_feat must have rank 4"):
        ifvd(s, t[0], labels, num_classes=CLASSES)
    with pytest.raises(ValueError, match="mask"):
        ifvd(s, t, labels, num_classes=CLASSES, mask=arrays["mask"][:, :2])
