import numpy as np
import pytest

from kdjax.losses.channel_wise import channel_wise_divergence
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import channel_wise_ref


def make_inputs(rng, batch, size=(3, 4), channels=3):
    shape = (batch, *size, channels)
    return {
        "student": rng.normal(0, 2, shape),
        "teacher": rng.normal(0, 2, shape),
        "mask": rng.random(shape[:3]) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher": inputs["student"].copy()}


class TestChannelWiseContract(LossContract):
    case = LossCase(loss=channel_wise_divergence, make_inputs=make_inputs, student=("student",),
                    teacher=("teacher",), identical=same_teacher)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("c_norm", [None, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(tau, c_norm, masked):
    inputs = make_inputs(np.random.default_rng(1), 2)
    if masked:
        inputs["mask"][1] = False  # one image with no valid position leaves the mean
    else:
        inputs.pop("mask")
    assert_matches_reference(channel_wise_divergence, channel_wise_ref.channel_wise_divergence,
                             inputs, ("student",), tau=tau, c_norm=c_norm)


@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_where_the_positions_are_summed_in_blocks(masked):
    # 16×16 = 256 positions: the spatial sums run in blocks (the CPU form of
    # kdjax.ops.reductions.sums).
    inputs = make_inputs(np.random.default_rng(5), 2, size=(16, 16))
    if not masked:
        inputs.pop("mask")
    assert_matches_reference(channel_wise_divergence, channel_wise_ref.channel_wise_divergence,
                             inputs, ("student",), tau=4.0)


def test_is_positive_and_invariant_to_per_channel_shifts():
    rng = np.random.default_rng(2)
    arrays = to_jax(make_inputs(rng, 2))
    s, t = arrays["student"], arrays["teacher"]
    base = channel_wise_divergence(s, t)
    shift = rng.normal(0, 5, (2, 1, 1, 3)).astype(np.float32)
    np.testing.assert_allclose(float(channel_wise_divergence(s + shift, t - shift)), float(base),
                               rtol=1e-5)
    assert float(base) > 0


def test_underflowing_student_softmax_stays_finite():
    # The original softmax().log() returns inf/NaN here (methods.md §1.2); log_softmax must not.
    rng = np.random.default_rng(3)
    s = rng.normal(0, 200, (1, 4, 4, 2)).astype(np.float32)
    t = rng.normal(0, 200, (1, 4, 4, 2)).astype(np.float32)
    assert np.isfinite(float(channel_wise_divergence(s, t, tau=1.0)))


@pytest.mark.torch
def test_matches_pytorch_formula():
    torch = pytest.importorskip("torch")
    inputs = make_inputs(np.random.default_rng(4), 2)
    s = torch.from_numpy(inputs["student"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(inputs["teacher"]).permute(0, 3, 1, 2)
    tau = 4.0
    n, c, h, w = s.shape
    # CIRKD CriterionCWD, norm_type='channel', divergence='kl' (C_norm = C_s = C here).
    p_t = torch.softmax(t.reshape(n, c, -1) / tau, dim=-1)
    log_p_s = torch.log_softmax(s.reshape(n, c, -1) / tau, dim=-1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() * tau**2 / (n * c)
    arrays = to_jax(inputs)
    got = channel_wise_divergence(arrays["student"], arrays["teacher"], tau=tau)
    np.testing.assert_allclose(float(got), kl.item(), rtol=1e-5)


def test_bad_input_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match="same shape"):
        channel_wise_divergence(arrays["student"][..., :2], arrays["teacher"])
    with pytest.raises(ValueError, match="tau"):
        channel_wise_divergence(arrays["student"], arrays["teacher"], tau=-1.0)
    with pytest.raises(ValueError, match="mask"):
        channel_wise_divergence(arrays["student"], arrays["teacher"], mask=arrays["mask"][0])
