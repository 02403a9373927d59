"""AT, FitNets and the SKD adversarial (hinge) losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses.adversarial import skd_adversarial_losses
from kdjax.losses.attention import attention_transfer
from kdjax.losses.fitnet import fitnet
from tests.devices import skip_unless_cpu
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import feature_ref


def make_features(rng, batch, size=(3, 4), student_channels=3, teacher_channels=5):
    return {
        "student_feat": rng.normal(0, 1, (batch, *size, student_channels)),
        "teacher_feat": rng.normal(0, 1, (batch, *size, teacher_channels)),
        "mask": rng.random((batch, *size)) > 0.3,
    }


def make_fitnet_inputs(rng, batch):
    inputs = make_features(rng, batch, student_channels=4, teacher_channels=4)
    return {"adapted_student_feat": inputs.pop("student_feat"), **inputs}


def make_scores(rng, batch):
    return {"d_student": rng.normal(0, 2, (batch, 2, 2, 1)),
            "d_teacher": rng.normal(0, 2, (batch, 2, 2, 1))}


class TestAttentionTransferContract(LossContract):
    case = LossCase(
        loss=attention_transfer, make_inputs=make_features, student=("student_feat",),
        teacher=("teacher_feat",),
        identical=lambda x: {**x, "teacher_feat": np.repeat(x["student_feat"], 2, axis=-1)})


class TestFitnetContract(LossContract):
    case = LossCase(loss=fitnet, make_inputs=make_fitnet_inputs,
                    student=("adapted_student_feat",), teacher=("teacher_feat",),
                    identical=lambda x: {**x, "teacher_feat": x["adapted_student_feat"].copy()})


class TestAdversarialContract(LossContract):
    # The discriminator trains through both scores: neither side is a frozen teacher here.
    case = LossCase(loss=skd_adversarial_losses, make_inputs=make_scores,
                    student=("d_student", "d_teacher"), teacher=(), mask=None, outputs=2)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_transfer_matches_reference(masked):
    inputs = make_features(np.random.default_rng(1), 2)
    if not masked:
        inputs.pop("mask")
    assert_matches_reference(attention_transfer, feature_ref.attention_transfer, inputs,
                             ("student_feat",))


@pytest.mark.parametrize("masked", [False, True])
def test_fitnet_matches_reference(masked):
    inputs = make_fitnet_inputs(np.random.default_rng(1), 2)
    if not masked:
        inputs.pop("mask")
    assert_matches_reference(fitnet, feature_ref.fitnet, inputs, ("adapted_student_feat",))


def test_adversarial_matches_reference():
    inputs = make_scores(np.random.default_rng(1), 2)
    assert_matches_reference(skd_adversarial_losses, feature_ref.skd_adversarial_losses, inputs,
                             ("d_student", "d_teacher"))


def test_attention_is_invariant_to_feature_scale_and_channel_permutation():
    rng = np.random.default_rng(2)
    arrays = to_jax(make_features(rng, 2))
    s, t = arrays["student_feat"], arrays["teacher_feat"]
    base = float(attention_transfer(s, t))
    np.testing.assert_allclose(float(attention_transfer(3.0 * s, t[..., ::-1])), base, rtol=1e-5)
    assert 0 < base <= 4.0 / (3 * 4)  # two unit vectors differ by at most 2 in norm


def test_hinge_losses_vanish_when_the_discriminator_is_confident():
    d_teacher = np.full((2, 2, 2, 1), 1.5, np.float32)
    d_student = np.full((2, 2, 2, 1), -1.5, np.float32)
    generator, discriminator = skd_adversarial_losses(d_student, d_teacher)
    assert float(discriminator) == 0.0 and float(generator) == 1.5


@pytest.mark.torch
def test_match_pytorch_formulas():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    inputs = make_features(rng, 2)
    s = torch.from_numpy(inputs["student_feat"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(inputs["teacher_feat"]).permute(0, 3, 1, 2)

    def at(x):  # CIRKD losses/at.py, p = 2
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    arrays = to_jax(inputs)
    got = attention_transfer(arrays["student_feat"], arrays["teacher_feat"])
    np.testing.assert_allclose(float(got), (at(s) - at(t)).pow(2).mean().item(), rtol=1e-5)

    fit = make_fitnet_inputs(rng, 2)
    want = F.mse_loss(torch.from_numpy(fit["adapted_student_feat"]).permute(0, 3, 1, 2),
                      torch.from_numpy(fit["teacher_feat"]).permute(0, 3, 1, 2))
    fit_arrays = to_jax(fit)
    got = fitnet(fit_arrays["adapted_student_feat"], fit_arrays["teacher_feat"])
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)

    scores = make_scores(rng, 2)
    d_s = torch.from_numpy(scores["d_student"])
    d_t = torch.from_numpy(scores["d_teacher"])
    g, d = skd_adversarial_losses(scores["d_student"], scores["d_teacher"])
    np.testing.assert_allclose(float(g), (-d_s.mean()).item(), rtol=1e-5)
    np.testing.assert_allclose(float(d), (F.relu(1 - d_t).mean() + F.relu(1 + d_s).mean()).item(),
                               rtol=1e-5)


def test_bad_input_raises():
    arrays = to_jax(make_features(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        attention_transfer(arrays["student_feat"][:, :2], arrays["teacher_feat"])
    with pytest.raises(ValueError, match="same shape"):
        fitnet(arrays["student_feat"], arrays["teacher_feat"])
    with pytest.raises(ValueError, match="non-empty"):
        skd_adversarial_losses(np.zeros((0,)), np.zeros((1,)))


@pytest.mark.parametrize("masked", [False, True])
def test_fitnet_keeps_no_feature_sized_temporary(masked):
    # The CPU form of the squared difference (kdjax.ops.cpu.reductions) under the `kdjax`
    # command's CPU flags (conftest), whose memory-saving scheduler once formed the gradient
    # beside the stored difference. The gradient is now the only map. Other platforms take the
    # plain form, whose buffers their compilers assign (benchmarks/NOTES.md item 50).
    skip_unless_cpu("the CPU form's buffers under the CPU compiler's schedule")
    rng = np.random.default_rng(4)
    s = jnp.asarray(rng.normal(0, 1, (2, 16, 16, 32)), jnp.float32)
    t = jnp.asarray(rng.normal(0, 1, (2, 16, 16, 32)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 16, 16)) > 0.3) if masked else None
    step = jax.jit(jax.value_and_grad(lambda s, t, mask: fitnet(s, t, mask=mask)))
    memory = step.lower(s, t, mask).compile().memory_analysis()
    assert memory.temp_size_in_bytes < s.nbytes


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1e-12, 1e-17])
def test_fitnet_is_exact_for_tiny_differences(scale, masked):
    # The value is summed from the gradient 2(s − t)/count, whose squares are count²/4 times
    # smaller than (s − t)²: at 1e-17 (count 16,384) nearly all of them are below float32's normal
    # range, while (s − t)² is not.
    rng = np.random.default_rng(8)
    s, t = (rng.normal(0, scale, (2, 16, 16, 32)).astype(np.float32) for _ in range(2))
    mask = rng.random((2, 16, 16)) > 0.3 if masked else np.ones((2, 16, 16), bool)
    step = jax.jit(jax.value_and_grad(lambda s, t, mask: fitnet(s, t, mask=mask)))
    value, grad = step(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask) if masked else None)
    difference = np.where(mask[..., None], s.astype(np.float64) - t, 0.0)
    count = mask.sum() * t.shape[-1]
    np.testing.assert_allclose(float(value), np.sum(difference ** 2) / count, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), 2 * difference / count, rtol=1e-5, atol=0)


def test_fitnet_ignores_masked_non_finite_values():
    rng = np.random.default_rng(5)
    s = rng.normal(0, 1, (1, 3, 4, 2)).astype(np.float32)
    t = rng.normal(0, 1, (1, 3, 4, 2)).astype(np.float32)
    mask = np.ones((1, 3, 4), bool)
    mask[0, 1, 2] = mask[0, 2, 3] = False
    s[0, 1, 2, 0], t[0, 2, 3, 1] = np.nan, np.inf
    value, grad = jax.value_and_grad(fitnet)(jnp.asarray(s), jnp.asarray(t), mask=jnp.asarray(mask))
    valid = mask[..., None]
    np.testing.assert_allclose(float(value), np.sum(np.where(valid, (s - t) ** 2, 0)) / (10 * 2),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.where(valid, 2 * (s - t) / 20, 0), rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_fitnet_forward_mode_matches_its_gradient(masked):
    inputs = to_jax(make_fitnet_inputs(np.random.default_rng(6), 2))
    s, t = inputs["adapted_student_feat"], inputs["teacher_feat"]
    mask = inputs["mask"] if masked else None
    direction = jnp.asarray(np.random.default_rng(7).normal(0, 1, s.shape), jnp.float32)
    value, tangent = jax.jvp(lambda x: fitnet(x, t, mask=mask), (s,), (direction,))
    grad = jax.grad(lambda x: fitnet(x, t, mask=mask))(s)
    np.testing.assert_allclose(float(value), float(fitnet(s, t, mask=mask)), rtol=1e-6)
    np.testing.assert_allclose(float(tangent), float(jnp.vdot(grad, direction)), rtol=1e-5)
