import numpy as np
import pytest

from kdjax.losses.normalized_feature import normalized_feature_distillation as nfd
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, grads, to_jax
from tests.references import normalized_feature_ref


def make_inputs(rng, batch, size=(3, 4), channels=3):
    shape = (batch, *size, channels)
    return {
        "student": rng.normal(-0.5, 1.5, shape),
        "teacher": rng.normal(1.0, 2.0, shape),
        "mask": rng.random(shape[:3]) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher": inputs["student"].copy()}


def student_case(**options):
    return LossCase(loss=nfd, make_inputs=None, student=("student",), teacher=(), options=options)


class TestNormalizedFeatureContract(LossContract):
    case = LossCase(loss=nfd, make_inputs=make_inputs, student=("student",), teacher=("teacher",),
                    identical=same_teacher)


class TestNormalizedFeatureFroContract(LossContract):
    case = LossCase(loss=nfd, make_inputs=make_inputs, student=("student",), teacher=("teacher",),
                    options={"axes": "spatial_channel", "ddof": 1, "distance": "fro_over_hw"},
                    identical=same_teacher)


@pytest.mark.parametrize("axes", ["spatial", "channel", "spatial_channel"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("distance", ["mse", "fro_over_hw"])
@pytest.mark.parametrize("normalize_student", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(axes, ddof, distance, normalize_student, masked):
    inputs = make_inputs(np.random.default_rng(1), 2, size=(2, 3))
    if masked:
        inputs["mask"][1] = False
        inputs["mask"][1, 1, 2] = True  # one valid position: a zero-variance spatial slice
    else:
        inputs.pop("mask")
    assert_matches_reference(nfd, normalized_feature_ref.normalized_feature_distillation, inputs,
                             ("student",), axes=axes, ddof=ddof, distance=distance,
                             normalize_student=normalize_student,
                             eps=1e-3 if masked else 1e-5)  # the eps option is exercised too


@pytest.mark.parametrize("axes, affine_shape", [
    ("spatial", (2, 1, 1, 3)),          # per image and channel
    ("channel", (2, 3, 4, 1)),          # per pixel
    ("spatial_channel", (2, 1, 1, 1)),  # per image
])
def test_invariant_to_affine_maps_of_the_normalised_slices(axes, affine_shape):
    rng = np.random.default_rng(2)
    inputs = make_inputs(rng, 2)
    inputs.pop("mask")
    scale = rng.uniform(0.5, 3.0, affine_shape)
    shift = rng.normal(0, 4, affine_shape)
    base = float(nfd(**to_jax(inputs), axes=axes))
    assert base > 0.1
    moved = to_jax({**inputs, "student": scale * inputs["student"] + shift,
                    "teacher": scale[::-1] * inputs["teacher"] - shift})
    # Equal up to the eps inside sqrt(σ² + eps) (relative effect ~eps/σ²).
    np.testing.assert_allclose(float(nfd(**moved, axes=axes)), base, rtol=1e-4)
    # Without normalising the student, its magnitude counts again.
    raw = float(nfd(**to_jax(inputs), axes=axes, normalize_student=False))
    raw_moved = float(nfd(**moved, axes=axes, normalize_student=False))
    assert abs(raw_moved - raw) > 1e-2


def test_spatial_mse_is_twice_one_minus_mean_correlation():
    # Standardised slices: mean((a−b)²) = 2 − 2ρ, with ρ the Pearson correlation over H·W.
    inputs = make_inputs(np.random.default_rng(3), 2)
    s, t = inputs["student"], inputs["teacher"]
    rho = np.mean([np.corrcoef(s[n, ..., c].ravel(), t[n, ..., c].ravel())[0, 1]
                   for n in range(2) for c in range(3)])
    got = float(nfd(**to_jax({"student": s, "teacher": t}), eps=1e-9))
    np.testing.assert_allclose(got, 2 - 2 * rho, rtol=1e-5)


def test_fro_over_hw_is_the_root_of_the_summed_mse_over_hw():
    inputs = make_inputs(np.random.default_rng(4), 2)
    inputs.pop("mask")
    arrays = to_jax(inputs)
    mse = float(nfd(**arrays, ddof=1))
    fro = float(nfd(**arrays, ddof=1, distance="fro_over_hw"))
    np.testing.assert_allclose(fro, np.sqrt(mse * 2 * 3 * 4 * 3) / (3 * 4), rtol=1e-5)


@pytest.mark.parametrize("axes", ["spatial", "channel", "spatial_channel"])
def test_mask_equals_cropping_the_masked_column(axes):
    inputs = make_inputs(np.random.default_rng(5), 2)
    inputs["mask"] = np.ones((2, 3, 4), bool)
    inputs["mask"][:, :, -1] = False
    inputs["student"][:, :, -1] = np.nan  # must not reach value or gradient
    inputs["teacher"][:, :, -1] = 1e6
    arrays = to_jax(inputs)
    cropped = to_jax({name: inputs[name][:, :, :-1] for name in ("student", "teacher")})
    for distance, factor in [("mse", 1.0), ("fro_over_hw", 3 / 4)]:  # fro still divides by full H·W
        got = float(nfd(**arrays, axes=axes, distance=distance))
        want = float(nfd(**cropped, axes=axes, distance=distance)) * factor
        np.testing.assert_allclose(got, want, rtol=1e-5)
        g = grads(student_case(axes=axes, distance=distance), arrays, ("student",))["student"]
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[:, :, -1] == 0)


def test_constant_features_stay_finite():
    inputs = make_inputs(np.random.default_rng(6), 2)
    inputs.pop("mask")
    inputs["student"][0] = 2.0
    inputs["teacher"][1, ..., 0] = -1.0
    arrays = to_jax(inputs)
    for distance in ("mse", "fro_over_hw"):
        for ddof in (0, 1):
            assert np.isfinite(float(nfd(**arrays, distance=distance, ddof=ddof)))
            g = grads(student_case(distance=distance, ddof=ddof), arrays, ("student",))["student"]
            assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("axes", ["spatial", "spatial_channel"])
def test_matches_reference_where_the_positions_are_summed_in_blocks(axes):
    # 16×16 = 256 positions: the spatial moments are summed in blocks (the CPU form of
    # kdjax.ops.reductions.sums).
    inputs = make_inputs(np.random.default_rng(8), 2, size=(16, 16))
    assert_matches_reference(nfd, normalized_feature_ref.normalized_feature_distillation, inputs,
                             ("student",), axes=axes)


@pytest.mark.parametrize("normalize_student", [True, False])
@pytest.mark.parametrize("noise", [1e-3, 1e-4])
def test_keeps_its_accuracy_when_the_maps_nearly_agree(normalize_student, noise):
    # A student within 1e-3 or 1e-4 of the teacher: the loss is a small difference of the maps'
    # large moments (about 1e-7 and 1e-9 after normalisation), and must keep its relative
    # accuracy. Both maps are float32 values, so the reference sees the same small gap.
    inputs = make_inputs(np.random.default_rng(9), 2, size=(16, 16))
    inputs.pop("mask")
    inputs["student"] = inputs["teacher"] + noise * np.random.default_rng(10).normal(
        size=inputs["teacher"].shape)
    inputs = {k: v.astype(np.float32).astype(np.float64) for k, v in inputs.items()}
    want = normalized_feature_ref.normalized_feature_distillation(
        **inputs, normalize_student=normalize_student)
    got = nfd(**to_jax(inputs), normalize_student=normalize_student)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if noise == 1e-3:
        # The gradient there is a difference of normalised values 1e-3 apart: float32 gives it to
        # about 1e-4, as does the central-difference reference.
        assert_matches_reference(nfd, normalized_feature_ref.normalized_feature_distillation,
                                 inputs, ("student",), rtol=1e-3,
                                 normalize_student=normalize_student)


@pytest.mark.torch
def test_matches_third_party_pytorch_form():
    # (F − mean) / torch.std over H,W per (n,c) for both, then ||N(F^T) − N(F^S)||_F / (W·H).
    torch = pytest.importorskip("torch")
    inputs = make_inputs(np.random.default_rng(7), 2, size=(4, 6))
    s = torch.from_numpy(inputs["student"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(inputs["teacher"]).permute(0, 3, 1, 2)

    def norm(f):
        return (f - f.mean((2, 3), keepdim=True)) / f.std((2, 3), keepdim=True)

    want = torch.norm(norm(t) - norm(s)) / (4 * 6)
    got = nfd(**to_jax({"student": inputs["student"], "teacher": inputs["teacher"]}), ddof=1,
              eps=1e-12, distance="fro_over_hw")
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"axes": "height"}, "axes"),
    ({"distance": "l1"}, "distance"),
    ({"ddof": 2}, "ddof"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-5}, "eps"),
    ({"normalize_student": "yes"}, "normalize_student"),
])
def test_bad_options_raise(kwargs, message):
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    with pytest.raises(ValueError, match=message):
        nfd(arrays["student"], arrays["teacher"], **kwargs)


def test_bad_shapes_raise():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    s, t = arrays["student"], arrays["teacher"]
    with pytest.raises(ValueError, match=r"student and teacher.*\(2, 3, 4, 2\) and \(2, 3, 4, 3\)"):
        nfd(s[..., :2], t)
    with pytest.raises(ValueError, match="student must have rank 4"):
        nfd(s[0], t[0])
    with pytest.raises(ValueError, match="mask must have shape"):
        nfd(s, t, mask=arrays["mask"][0])
