import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses.dist import dist, pearson
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference, grads,
                                   relative_error, to_jax)
from tests.references import dist_ref


def make_inputs(rng, batch, size=(3, 4), classes=5):
    shape = (batch, *size, classes)
    return {
        "student_logits": rng.normal(0, 2, shape),
        "teacher_logits": rng.normal(0, 2, shape),
        "mask": rng.random(shape[:3]) > 0.3,
    }


def same_teacher(inputs):
    return {**inputs, "teacher_logits": inputs["student_logits"].copy()}


def student_case(**options):
    return LossCase(loss=dist, make_inputs=None, student=("student_logits",), teacher=(),
                    options=options)


class TestDistContract(LossContract):
    case = LossCase(loss=dist, make_inputs=make_inputs, student=("student_logits",),
                    teacher=("teacher_logits",), identical=same_teacher)


class TestDistPerImageGroupsContract(LossContract):
    case = LossCase(loss=dist, make_inputs=make_inputs, student=("student_logits",),
                    teacher=("teacher_logits",),
                    options={"group_size": 1, "tau": 2.0, "beta": 0.5, "gamma": 2.0},
                    identical=same_teacher)


@pytest.mark.parametrize("group_size", [None, 1, 2])
@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (2.5, 0.5, 2.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(group_size, tau, beta, gamma, masked):
    inputs = make_inputs(np.random.default_rng(1), 4, size=(2, 3))
    if masked:
        inputs["mask"][2:] = False  # a whole group (or two images) without valid pixels
    else:
        inputs.pop("mask")
    assert_matches_reference(dist, dist_ref.dist, inputs, ("student_logits",), tau=tau, beta=beta,
                             gamma=gamma, group_size=group_size)


def test_invariant_to_per_pixel_logit_shifts():
    rng = np.random.default_rng(2)
    inputs = make_inputs(rng, 2)
    arrays = to_jax(inputs)
    base = float(dist(arrays["student_logits"], arrays["teacher_logits"], group_size=1, tau=2.0))
    shifted = to_jax({
        "s": inputs["student_logits"] + rng.normal(0, 5, (2, 3, 4, 1)),
        "t": inputs["teacher_logits"] + rng.normal(0, 5, (2, 3, 4, 1)),
    })
    got = float(dist(shifted["s"], shifted["t"], group_size=1, tau=2.0))
    assert base > 0.1
    np.testing.assert_allclose(got, base, rtol=1e-5)


@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (3.0, 0.5, 2.0)])
def test_bounds_are_reached_by_reversed_binary_predictions(tau, beta, gamma):
    rng = np.random.default_rng(3)
    upper = 2 * tau**2 * (beta + gamma)
    for seed in range(3):
        arrays = to_jax(make_inputs(np.random.default_rng(seed), 2, classes=3))
        value = float(dist(arrays["student_logits"], arrays["teacher_logits"], tau=tau, beta=beta,
                           gamma=gamma))
        assert 0 <= value <= upper
    # With two classes softmax(−z) reverses softmax(z): both correlations are −1, the maximum.
    z = rng.normal(0, 3, (2, 3, 4, 2))
    arrays = to_jax({"s": z, "t": -z})
    value = float(dist(arrays["s"], arrays["t"], tau=tau, beta=beta, gamma=gamma))
    assert value <= upper
    np.testing.assert_allclose(value, upper, rtol=1e-5)


def test_group_size_semantics():
    inputs = make_inputs(np.random.default_rng(4), 4)
    inputs.pop("mask")
    arrays = to_jax(inputs)
    s, t = arrays["student_logits"], arrays["teacher_logits"]
    whole = float(dist(s, t))
    np.testing.assert_allclose(float(dist(s, t, group_size=4)), whole, rtol=1e-6)
    # group_size=2 is what a per-device batch of 2 computes, averaged over devices.
    halves = (float(dist(s[:2], t[:2])) + float(dist(s[2:], t[2:]))) / 2
    grouped = float(dist(s, t, group_size=2))
    np.testing.assert_allclose(grouped, halves, rtol=1e-5)
    assert abs(grouped - whole) > 1e-4
    # The inter-class term is per pixel: grouping cannot change it.
    inter = [float(dist(s, t, gamma=0.0, group_size=g)) for g in (None, 1, 2)]
    np.testing.assert_allclose(inter, inter[0], rtol=1e-6)


def test_masked_pixels_leave_the_loss_and_gradient():
    rng = np.random.default_rng(5)
    inputs = make_inputs(rng, 2)
    hidden = ~inputs["mask"]
    base = float(dist(**to_jax(inputs), group_size=1))
    poisoned = {k: v.copy() for k, v in inputs.items()}
    poisoned["student_logits"][hidden] = np.nan
    poisoned["teacher_logits"][hidden] = 1e4
    arrays = to_jax(poisoned)
    np.testing.assert_allclose(float(dist(**arrays, group_size=1)), base, rtol=1e-6)
    g = np.asarray(grads(student_case(group_size=1), arrays, ("student_logits",))["student_logits"])
    assert np.all(np.isfinite(g)) and np.all(g[hidden] == 0)


def _pearson_by_autodiff(a, b, axis, valid):
    """The same correlation differentiated by JAX through the centring (float64)."""
    valid = jnp.broadcast_to(valid, a.shape)
    count = jnp.maximum(jnp.sum(valid, axis=axis, keepdims=True), 1)
    a, b = (jnp.where(valid, x, 0.0) for x in (a, b))
    a, b = (jnp.where(valid, x - jnp.sum(x, axis=axis, keepdims=True) / count, 0.0) for x in (a, b))
    norm_a, norm_b = (jnp.sqrt(jnp.sum(x * x, axis=axis)) for x in (a, b))
    return jnp.sum(a * b, axis=axis) / (norm_a * norm_b + 1e-8)


@pytest.mark.parametrize("axis", [0, 1])
def test_pearson_gradient_in_both_arguments_matches_autodiff(axis):
    # The written-out gradient skips the centring's backward (it is centred already): both
    # arguments against float64 autodiff, with masked entries and a slice that has none valid.
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, (2, 6, 7))
    valid = rng.random((6, 7)) > 0.3
    valid[:, 2] = False
    valid[3, :] = False
    cotangent = rng.normal(0, 1, (6, 7)[:axis] + (6, 7)[axis + 1:])
    with jax.enable_x64():
        def pulled(fn):
            _, vjp = jax.vjp(lambda x, y: fn(x, y, axis, jnp.asarray(valid)), jnp.asarray(a),
                             jnp.asarray(b))
            return vjp(jnp.asarray(cotangent))

        want = pulled(_pearson_by_autodiff)
    got = jax.vjp(lambda x, y: pearson(x, y, axis, jnp.asarray(valid)),
                  jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))[1](
        jnp.asarray(cotangent, jnp.float32))
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5
        assert np.all(np.asarray(g)[~valid] == 0)


def test_uniform_predictions_have_finite_gradient():
    # A constant row or column has a zero norm: the correlation is 0 and the gradient finite.
    inputs = make_inputs(np.random.default_rng(6), 2)
    inputs.pop("mask")
    inputs["student_logits"][0, 0, 0] = 0.0
    inputs["teacher_logits"][:, :, :, 1] = inputs["teacher_logits"][:, :, :, 0]
    inputs["teacher_logits"][1] = 3.0
    arrays = to_jax(inputs)
    g = grads(student_case(), arrays, ("student_logits",))["student_logits"]
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.isfinite(float(dist(**arrays)))


def _torch_pearson(torch, x, y, eps=1e-8):
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def _torch_dist(torch, z_s, z_t, beta=1.0, gamma=1.0, tau=1.0):
    """DIST_KD segmentation formula (NCHW): transpose(1,3)-flatten, softmax, Pearson; mmrazor τ²."""
    k = z_s.shape[1]
    y_s = torch.softmax(z_s.transpose(1, 3).reshape(-1, k) / tau, dim=1)
    y_t = torch.softmax(z_t.detach().transpose(1, 3).reshape(-1, k) / tau, dim=1)
    inter = 1 - _torch_pearson(torch, y_s, y_t).mean()
    intra = 1 - _torch_pearson(torch, y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.torch
@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_matches_pytorch_formula_value_and_gradient(tau, beta, gamma):
    torch = pytest.importorskip("torch")
    inputs = make_inputs(np.random.default_rng(7), 4, size=(4, 6))
    inputs.pop("mask")
    s = torch.from_numpy(inputs["student_logits"]).permute(0, 3, 1, 2).requires_grad_(True)
    t = torch.from_numpy(inputs["teacher_logits"]).permute(0, 3, 1, 2)
    # Per-device batches of 2 images; data-parallel training averages the per-device losses.
    want = sum(_torch_dist(torch, s[i:i + 2], t[i:i + 2], beta, gamma, tau) for i in (0, 2)) / 2
    want.backward()
    want_whole = _torch_dist(torch, s, t, beta, gamma, tau).item()

    arrays = to_jax(inputs)
    options = {"tau": tau, "beta": beta, "gamma": gamma}
    np.testing.assert_allclose(float(dist(**arrays, **options)), want_whole, rtol=1e-5)
    np.testing.assert_allclose(float(dist(**arrays, group_size=2, **options)), want.item(),
                               rtol=1e-5)
    got_grad = grads(student_case(group_size=2, **options), arrays,
                     ("student_logits",))["student_logits"]
    assert relative_error(got_grad, s.grad.permute(0, 2, 3, 1).numpy()) < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 0.0}, "tau"),
    ({"beta": -1.0}, "beta"),
    ({"gamma": -0.5}, "gamma"),
    ({"group_size": 3}, "group_size.*batch size 2"),
    ({"group_size": 0}, "group_size"),
])
def test_bad_options_raise(kwargs, message):
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    with pytest.raises(ValueError, match=message):
        dist(arrays["student_logits"], arrays["teacher_logits"], **kwargs)


def test_bad_shapes_raise():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    s, t = arrays["student_logits"], arrays["teacher_logits"]
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\) and \(2, 3, 4, 4\)"):
        dist(s, t[..., :4])
    with pytest.raises(ValueError, match="student_logits must have rank 4"):
        dist(s[0], t[0])
    with pytest.raises(ValueError, match=r"mask must have shape.*\(2, 3, 4\).*\(2, 3\)"):
        dist(s, t, mask=arrays["mask"][:, :, 0])
