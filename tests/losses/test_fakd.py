import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses.channel_wise import channel_wise_divergence
from kdjax.losses.fakd import (ClassCovariance, _chunk_of_images, fakd_cwd, fakd_kd,
                               fakd_strength, init_class_covariance, update_class_covariance)
from kdjax.losses.pixel_kd import pixel_kd
from tests.losses.contract import LossCase, LossContract, assert_matches_reference, to_jax
from tests.references import fakd_ref

CLASSES, DIM = 4, 3


def make_inputs(rng, batch, size=(3, 4), classes=CLASSES, dim=DIM, label_size=(5, 7)):
    shape = (batch, *size, classes)
    labels = rng.integers(0, classes, (batch, *label_size))
    labels[rng.random(labels.shape) < 0.2] = 255
    return {
        "student_logits": rng.normal(0, 2, shape),
        "teacher_logits": rng.normal(0, 2, shape),
        "classifier_kernel": rng.normal(0, 1, (dim, classes)),
        "variance": rng.uniform(0.2, 1.5, (classes, dim)),
        "labels": labels,
        "mask": rng.random(shape[:3]) > 0.3,
    }


UNBATCHED = {"classifier_kernel": None, "variance": None}
STUDENT = ("student_logits", "classifier_kernel")


class TestFakdKDContract(LossContract):
    # For λ > 0 the bound exceeds the KL, so it is not zero at identical inputs (see λ = 0 below).
    case = LossCase(loss=fakd_kd, make_inputs=make_inputs, student=STUDENT,
                    teacher=("teacher_logits", "variance"),
                    options={"strength": 2.0, "temperature": 2.0}, batch_axis=UNBATCHED)


class TestFakdCWDContract(LossContract):
    case = LossCase(loss=fakd_cwd, make_inputs=make_inputs, student=STUDENT,
                    teacher=("teacher_logits", "variance"), options={"strength": 3.0, "tau": 2.0},
                    batch_axis=UNBATCHED)


# The tests keep to one input shape and mostly to the contract's options, so that the compiled
# programs are reused from test to test.


def without_mask(inputs):
    return {k: v for k, v in inputs.items() if k != "mask"}


def jax_inputs(seed=0, masked=False, **kwargs):
    inputs = make_inputs(np.random.default_rng(seed), 2, **kwargs)
    return to_jax(inputs if masked else without_mask(inputs))


BOTH = [(fakd_kd, {"temperature": 2.0}), (fakd_cwd, {"tau": 2.0})]


# --- value and gradient against the float64 references -----------------------------------------


# λ = 0 is checked against pixel_kd / channel_wise_divergence below (they have references).
# An odd class count as well: the bound runs over the target classes two at a time.
@pytest.mark.parametrize("temperature, masked, classes", [(1.0, False, CLASSES), (2.0, True, 5)])
def test_kd_matches_reference(temperature, masked, classes):
    inputs = make_inputs(np.random.default_rng(1), 2, classes=classes)
    if not masked:
        inputs.pop("mask")
    assert_matches_reference(fakd_kd, fakd_ref.fakd_kd, inputs, STUDENT, strength=2.5,
                             temperature=temperature)


@pytest.mark.parametrize("tau, c_norm, masked",
                         [(1.0, None, False), (2.0, None, True), (4.0, 2, True)])
def test_cwd_matches_reference(tau, c_norm, masked):
    inputs = make_inputs(np.random.default_rng(2), 2)
    if masked:
        inputs["mask"][1] = False  # one image with no valid position leaves the mean
    else:
        inputs.pop("mask")
    assert_matches_reference(fakd_cwd, fakd_ref.fakd_cwd, inputs, STUDENT, strength=6.0, tau=tau,
                             c_norm=c_norm)


@pytest.mark.parametrize("loss, reference, options", [
    (fakd_kd, fakd_ref.fakd_kd, {"temperature": 2.0}),
    (fakd_cwd, fakd_ref.fakd_cwd, {"tau": 2.0}),
])
def test_ignore_label_minus_one_and_conv_kernel(loss, reference, options):
    # CIRKD's ignore label −1, and the (1, 1, A, K) kernel of an NNX Conv.
    inputs = make_inputs(np.random.default_rng(3), 2)
    inputs["labels"][inputs["labels"] == 255] = -1
    inputs["classifier_kernel"] = inputs["classifier_kernel"][None, None]
    a = to_jax(inputs)
    got = float(loss(**a, strength=4.0, ignore_label=-1, **options))
    np.testing.assert_allclose(got, reference(**inputs, strength=4.0, ignore_label=-1, **options),
                               rtol=1e-5)
    # With 255 as the ignore value, −1 is still no class: the same pixels go unaugmented.
    assert float(loss(**a, strength=4.0, **options)) == got
    np.testing.assert_array_equal(
        np.asarray(loss(**{**a, "classifier_kernel": a["classifier_kernel"][0, 0]}, strength=4.0,
                        ignore_label=-1, **options)), got)


# --- λ = 0 is the plain loss --------------------------------------------------------------------


@pytest.mark.parametrize("fakd, plain, option", [(fakd_kd, pixel_kd, "temperature"),
                                                  (fakd_cwd, channel_wise_divergence, "tau")])
@pytest.mark.parametrize("temperature, masked, traced", [(1.0, False, False), (2.0, True, True)])
def test_zero_strength_is_the_plain_loss(fakd, plain, option, temperature, masked, traced):
    """Also for a traced strength (λ(t) in a train step), which takes the loss's own branch."""
    a = jax_inputs(seed=4 if fakd is fakd_kd else 5, masked=masked)
    mask = a.get("mask")
    options = {option: temperature, "mask": mask}
    strength = jnp.float32(0.0) if traced else 0.0

    def bound(s, w):
        return fakd(s, a["teacher_logits"], w, a["variance"], a["labels"], strength=strength,
                    **options)

    value, (g_s, g_w) = jax.value_and_grad(bound, argnums=(0, 1))(a["student_logits"],
                                                                    a["classifier_kernel"])
    want, want_g = jax.value_and_grad(lambda s: plain(s, a["teacher_logits"], **options))(
        a["student_logits"])
    # Eagerly the plain loss runs op by op, inside lax.cond as one compiled branch: one ulp apart.
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6 if traced else 1e-7)
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(want_g), rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(g_w) == 0)


@pytest.mark.parametrize("loss, plain, options", [
    (fakd_kd, pixel_kd, {"temperature": 2.0}),
    (fakd_cwd, channel_wise_divergence, {"tau": 2.0}),
])
def test_no_augmentation_without_a_class_or_without_variance(loss, plain, options):
    a = jax_inputs(seed=6, masked=True)
    args = (a["student_logits"], a["teacher_logits"])
    want = float(plain(*args, mask=a["mask"], **options))
    common = {"strength": 5.0, "mask": a["mask"], **options}
    ignored = jnp.full_like(a["labels"], 255)
    out_of_range = jnp.full_like(a["labels"], CLASSES)  # not a class either
    zero_var = jnp.zeros_like(a["variance"])
    for labels, variance in ((ignored, a["variance"]), (out_of_range, a["variance"]),
                             (a["labels"], zero_var)):
        got = loss(*args, a["classifier_kernel"], variance, labels, **common)
        np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert float(loss(*args, a["classifier_kernel"], a["variance"], a["labels"], **common)) > want


# --- the bound holds, tightens as λ → 0 and grows with λ ----------------------------------------

SAMPLES = 20000


def monte_carlo(inputs, strength, noise, samples_fn, **options):
    augmented = fakd_ref.augmented_logits(inputs["student_logits"], inputs["classifier_kernel"],
                                          inputs["variance"], inputs["labels"], strength, noise)
    values = samples_fn(augmented, inputs["teacher_logits"], mask=inputs.get("mask"), **options)
    return values.mean(), values.std(ddof=1) / np.sqrt(values.size)


@pytest.mark.parametrize("loss, samples_fn, options, masked", [
    (fakd_kd, fakd_ref.pixel_kd_samples, {"temperature": 1.0}, False),
    (fakd_kd, fakd_ref.pixel_kd_samples, {"temperature": 2.0}, True),
    (fakd_cwd, fakd_ref.cwd_samples, {"tau": 1.0}, False),
    (fakd_cwd, fakd_ref.cwd_samples, {"tau": 2.0}, True),
])
def test_bound_is_above_monte_carlo_estimate_and_tightens_as_strength_vanishes(
        loss, samples_fn, options, masked):
    rng = np.random.default_rng(7)
    inputs = make_inputs(rng, 2)
    if not masked:
        inputs.pop("mask")
    arrays = to_jax(inputs)
    # The same standard-normal draws for every λ, so the estimates vary smoothly with λ.
    noise = rng.standard_normal((SAMPLES, 2, 3, 4, DIM))
    plain = float(loss(**arrays, strength=0.0, **options))
    gaps = []
    for strength in (4.0, 1.0, 0.25, 0.0625):
        bound = float(loss(**arrays, strength=strength, **options))
        estimate, stderr = monte_carlo(inputs, strength, noise, samples_fn, **options)
        assert bound >= estimate - 3 * stderr, (strength, bound, estimate, stderr)
        # The augmentation itself costs something: -log softmax is convex in the logits.
        assert estimate > plain
        gaps.append(bound - estimate)
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.05 * gaps[0], gaps


@pytest.mark.parametrize("loss, samples_fn, options", [
    (fakd_kd, fakd_ref.pixel_kd_samples, {"temperature": 1.0}),
    (fakd_cwd, fakd_ref.cwd_samples, {"tau": 1.0}),
])
def test_bound_is_tight_where_the_jensen_gap_vanishes(loss, samples_fn, options):
    # Student and (more) confident teacher agree on one class per pixel (KD) or one position per
    # channel (CWD): the augmented sum inside the log then stays small, log(1 + ε) ≈ ε is linear and
    # the bound's excess over the plain loss must match the Monte-Carlo excess. A wrong constant in
    # the exponent (e.g. λ/τ² or λ/(4τ²)) is off by far more than the 5% allowed here.
    rng = np.random.default_rng(23)
    inputs = make_inputs(rng, 2)
    inputs.pop("mask")
    peak = np.zeros(inputs["student_logits"].shape)
    if loss is fakd_kd:
        peak[...] = np.eye(CLASSES)[rng.integers(0, CLASSES, (2, 3, 4))]
    else:
        for b, c in np.ndindex(2, CLASSES):
            peak[b, rng.integers(0, 3), rng.integers(0, 4), c] = 1.0
    inputs["student_logits"] = 10.0 * peak + rng.normal(0, 0.3, peak.shape)
    inputs["teacher_logits"] = 30.0 * peak
    noise = rng.standard_normal((SAMPLES, 2, 3, 4, DIM))
    strength = 0.25
    arrays = to_jax(inputs)
    plain = float(loss(**arrays, strength=0.0, **options))
    bound = float(loss(**arrays, strength=strength, **options))
    estimate, stderr = monte_carlo(inputs, strength, noise, samples_fn, **options)
    assert bound >= estimate - 3 * stderr
    assert bound - plain <= 1.05 * (estimate - plain), (bound, estimate, plain)


@pytest.mark.parametrize("loss, options", BOTH)
def test_bound_grows_monotonically_with_strength(loss, options):
    a = jax_inputs(seed=8, masked=True)
    strengths = (0.0, 0.1, 0.5, 1.0, 2.0, 7.5, 10.0)
    values = [float(loss(**a, strength=lam, **options)) for lam in strengths]
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values


@pytest.mark.torch
def test_kd_bound_matches_pytorch_isda_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    inputs = make_inputs(rng, 2)
    inputs["labels"] = rng.integers(0, CLASSES, (2, 5, 7))  # every pixel has a class
    labels = fakd_ref.resize_labels(inputs["labels"], 3, 4)
    lam = 2.0
    # With q the one-hot ground truth (τ = 1) the bound is ISDA's loss: the cross-entropy at class y
    # of z_j + λ/2 · Σ_a (w_j − w_y)² σ²_{y,a}; here in NCHW PyTorch with the 1×1 conv's weight.
    z = torch.from_numpy(inputs["student_logits"]).permute(0, 3, 1, 2)
    weight = torch.from_numpy(inputs["classifier_kernel"]).T  # Conv2d weight (K, A)
    cv = torch.from_numpy(inputs["variance"])
    y = torch.from_numpy(labels)
    k = z.shape[1]
    rows = y.reshape(-1)
    diff = weight[None, :, :] - weight[rows][:, None, :]  # (P, K, A): w_j − w_y
    sigma2 = 0.5 * lam * (diff**2 * cv[rows][:, None, :]).sum(-1)
    aug = z.permute(0, 2, 3, 1).reshape(-1, k) + sigma2
    isda = torch.nn.functional.cross_entropy(aug, rows)
    a = to_jax({**inputs, "teacher_logits": 60.0 * np.eye(CLASSES)[labels]})
    got = fakd_kd(a["student_logits"], a["teacher_logits"], a["classifier_kernel"], a["variance"],
                  a["labels"], strength=lam)
    np.testing.assert_allclose(float(got), isda.item(), rtol=1e-5)


def test_traced_strength_equals_a_python_one():
    a = jax_inputs(seed=6, masked=True)

    def loss(s, strength):
        return fakd_cwd(s, a["teacher_logits"], a["classifier_kernel"], a["variance"], a["labels"],
                        strength=strength, tau=2.0, mask=a["mask"])

    traced = jax.jit(jax.value_and_grad(loss))(a["student_logits"], jnp.float32(3.0))
    python = jax.value_and_grad(loss)(a["student_logits"], 3.0)
    np.testing.assert_allclose(float(traced[0]), float(python[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(traced[1]), np.asarray(python[1]), rtol=1e-5, atol=1e-8)


# --- properties and numerical stability ----------------------------------------------------------


def test_kd_bound_invariances():
    a = jax_inputs(seed=11, masked=True)
    base = float(fakd_kd(**a, strength=3.0, temperature=2.0))
    rng = np.random.default_rng(11)
    # Per-pixel logit shifts change no softmax; M only sees differences of classifier columns.
    pixel_shift = jnp.asarray(rng.normal(0, 5, (2, 3, 4, 1)), jnp.float32)
    column_shift = jnp.asarray(rng.normal(0, 2, (DIM, 1)), jnp.float32)
    shifted = fakd_kd(**{**a, "student_logits": a["student_logits"] + pixel_shift,
                         "teacher_logits": a["teacher_logits"] - pixel_shift,
                         "classifier_kernel": a["classifier_kernel"] + column_shift},
                      strength=3.0, temperature=2.0)
    np.testing.assert_allclose(float(shifted), base, rtol=1e-5)
    # The CWD bound reads w_c itself, so only per-channel logit shifts leave it unchanged.
    cwd = float(fakd_cwd(**a, strength=3.0, tau=2.0))
    channel_shift = jnp.asarray(rng.normal(0, 5, (2, 1, 1, CLASSES)), jnp.float32)
    np.testing.assert_allclose(
        float(fakd_cwd(**{**a, "student_logits": a["student_logits"] + channel_shift,
                          "teacher_logits": a["teacher_logits"] - channel_shift},
                       strength=3.0, tau=2.0)), cwd, rtol=1e-5)


@pytest.mark.parametrize("loss, options", BOTH)
def test_identical_inputs_give_zero_only_without_augmentation(loss, options):
    a = jax_inputs(seed=12, masked=True)
    a["teacher_logits"] = a["student_logits"]
    assert abs(float(loss(**a, strength=0.0, **options))) < 1e-6
    assert float(loss(**a, strength=2.0, **options)) > 1e-3


def test_cwd_stable_when_one_position_dominates():
    # One position far above the rest in every channel: the full spatial sum is all argmax term, so
    # a leave-one-out sum formed there as (sum − own term) cancels to 0 (log 0, NaN gradients).
    inputs = make_inputs(np.random.default_rng(14), 2)
    inputs.pop("mask")
    inputs["student_logits"][:, 1, 2, :] += 300.0
    assert_matches_reference(fakd_cwd, fakd_ref.fakd_cwd, inputs, STUDENT, strength=5.0, tau=1.0)


def test_cwd_excess_at_a_dominating_position_is_not_cancelled():
    # Teacher and student both put (almost) all mass on one position, 25/τ above the rest: in
    # float32 the full sum there rounds to its own term, yet with the augmentation its leave-one-out
    # term is log(1 + Σ_j exp(−25 + β(s_i + s_j) + …)), far from 0, and it carries almost all of q.
    inputs = make_inputs(np.random.default_rng(22), 2)
    inputs.pop("mask")
    for name in ("student_logits", "teacher_logits"):
        inputs[name] = inputs[name] / 4
        inputs[name][:, 1, 2, :] += 25.0
    inputs["variance"] *= 2.0
    arrays = to_jax(inputs)
    options = {"strength": 8.0, "tau": 1.0}
    excess = float(fakd_cwd(**arrays, **options)) - float(channel_wise_divergence(
        arrays["student_logits"], arrays["teacher_logits"], tau=1.0))
    want = (fakd_ref.fakd_cwd(**inputs, **options)
            - fakd_ref.fakd_cwd(**inputs, strength=0.0, tau=1.0))
    assert want > 1e-3
    np.testing.assert_allclose(excess, want, rtol=1e-4)
    assert_matches_reference(fakd_cwd, fakd_ref.fakd_cwd, inputs, STUDENT, **options)


@pytest.mark.parametrize("masked", [False, True])
def test_cwd_in_chunks_of_images_equals_one_chunk(masked):
    # Three images in chunks of two: one lax.map step and a remainder; in chunks of one: three steps.
    inputs = make_inputs(np.random.default_rng(23), 3)
    if masked:
        inputs["mask"][1] = False
    a = to_jax(inputs if masked else without_mask(inputs))

    def bound(s, w, chunk):
        return fakd_cwd(**{**a, "student_logits": s, "classifier_kernel": w}, strength=3.0,
                        tau=2.0, images_per_chunk=chunk)

    grad = jax.jit(jax.value_and_grad(bound, argnums=(0, 1)), static_argnums=2)
    value, grads = grad(a["student_logits"], a["classifier_kernel"], None)
    for chunk in (2, 1):
        got, got_grads = grad(a["student_logits"], a["classifier_kernel"], chunk)
        np.testing.assert_allclose(float(got), float(value), rtol=1e-6)
        for g, want in zip(got_grads, grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-8)


def test_cwd_tied_maxima_match_reference():
    # One class everywhere, so u is constant per channel and ties in z are ties in z + u: a channel
    # where every position ties, and one with two equal maxima.
    inputs = make_inputs(np.random.default_rng(24), 2)
    inputs.pop("mask")
    inputs["labels"][:] = 1
    inputs["student_logits"][0, :, :, 0] = 1.5
    inputs["student_logits"][1, 0, 0, 2] = inputs["student_logits"][1, 2, 3, 2] = 9.0
    assert_matches_reference(fakd_cwd, fakd_ref.fakd_cwd, inputs, STUDENT, strength=3.0, tau=2.0)


def test_chunks_of_images_keep_the_scratch_within_the_budget():
    mb = 2**20
    assert _chunk_of_images(None, 8, 7 * mb, 16 * mb) == 2
    assert _chunk_of_images(None, 8, 40 * mb, 16 * mb) == 1
    assert _chunk_of_images(None, 8, mb, 16 * mb) == 8
    # Without a budget the batch is one step (it may be sharded across devices); a chunk the
    # caller names wins.
    assert _chunk_of_images(None, 8, 40 * mb, None) == 8
    assert _chunk_of_images(3, 8, 40 * mb, 16 * mb) == 3
    with pytest.raises(ValueError, match="scratch_bytes"):
        _chunk_of_images(None, 8, mb, 0)


def test_kd_stable_for_large_logits_and_large_augmentation():
    inputs = make_inputs(np.random.default_rng(15), 2)
    inputs.pop("mask")
    inputs["student_logits"] *= 100.0
    inputs["variance"] *= 200.0  # β·M reaches hundreds: exp() would overflow without the log domain
    assert_matches_reference(fakd_kd, fakd_ref.fakd_kd, inputs, STUDENT, strength=7.5)


def test_strength_may_be_traced():
    a = jax_inputs(seed=16, masked=True)

    @jax.jit
    def step_losses(step):
        lam = fakd_strength(step, 100)
        return fakd_kd(**a, strength=lam), fakd_cwd(**a, strength=lam)

    got = step_losses(jnp.asarray(40))
    np.testing.assert_allclose(float(got[0]), float(fakd_kd(**a, strength=3.0)), rtol=1e-6)
    np.testing.assert_allclose(float(got[1]), float(fakd_cwd(**a, strength=3.0)), rtol=1e-6)


def test_fakd_strength_ramp():
    assert fakd_strength(0, 80) == 0.0
    np.testing.assert_allclose(float(fakd_strength(20, 80)), 7.5 / 4, rtol=1e-7)
    np.testing.assert_allclose(float(fakd_strength(80, 80)), 7.5, rtol=1e-7)
    np.testing.assert_allclose(float(fakd_strength(30, 120, lam0=2.5)), 0.625, rtol=1e-7)
    traced = jax.jit(fakd_strength)(jnp.arange(5), 4)
    assert traced.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(traced), 7.5 * np.arange(5) / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        fakd_strength(1, 0)


# --- the class-covariance estimator --------------------------------------------------------------


def covariance_batch(rng, batch=2, size=(3, 4), label_size=(5, 7), classes=CLASSES, present=None):
    classes = np.arange(classes) if present is None else present
    labels = rng.choice(classes, (batch, *label_size))
    labels[rng.random(labels.shape) < 0.2] = 255
    return {
        "features": rng.normal(rng.normal(0, 3, DIM), rng.uniform(0.5, 2, DIM),
                               (batch, *size, DIM)),
        "labels": labels,
        "mask": rng.random((batch, *size)) > 0.25,
    }


def test_init_class_covariance():
    state = init_class_covariance(CLASSES, DIM)
    assert isinstance(state, ClassCovariance)
    assert state.mean.shape == state.var.shape == (CLASSES, DIM) and state.count.shape == (CLASSES,)
    for leaf in state:
        assert leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))
    with pytest.raises(ValueError, match="num_classes"):
        init_class_covariance(0, DIM)


@pytest.mark.parametrize("masked", [False, True])
def test_covariance_update_matches_streaming_reference_and_all_data_statistics(masked):
    rng = np.random.default_rng(17)
    state = init_class_covariance(CLASSES, DIM)
    update = jax.jit(update_class_covariance)
    want = tuple(np.asarray(x, np.float64) for x in state)
    seen = []
    for b in range(4):
        # Class 3 is absent from the second batch.
        batch = covariance_batch(rng, present=np.arange(3) if b == 1 else None)
        mask = batch["mask"] if masked else None
        state = update(state, batch["features"].astype(np.float32), batch["labels"], mask=mask)
        want = fakd_ref.update_class_covariance(*want, batch["features"], batch["labels"],
                                                mask=mask)
        for got, expected in zip(state, want, strict=True):
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
        y = fakd_ref.resize_labels(batch["labels"], 3, 4)
        keep = np.ones(y.shape, bool) if mask is None else mask
        seen.append((batch["features"][keep], y[keep]))
    # The streaming rule keeps the exact mean and biased variance of every feature seen so far.
    features = np.concatenate([f for f, _ in seen])
    labels = np.concatenate([y for _, y in seen])
    for k in range(CLASSES):
        f = features[labels == k]
        assert f.shape[0] == state.count[k] > 0
        np.testing.assert_allclose(np.asarray(state.mean[k]), f.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.var[k]), f.var(0), rtol=1e-5, atol=1e-6)


def test_covariance_absent_classes_keep_their_state():
    rng = np.random.default_rng(18)
    state = ClassCovariance(mean=jnp.asarray(rng.normal(0, 1, (CLASSES, DIM)), jnp.float32),
                            var=jnp.asarray(rng.uniform(0.1, 1, (CLASSES, DIM)), jnp.float32),
                            count=jnp.asarray([5.0, 0.0, 7.0, 3.0], jnp.float32))
    batch = covariance_batch(rng, present=np.array([0, 2]))
    new = update_class_covariance(state, batch["features"], batch["labels"])
    for k in (1, 3):  # absent: unchanged bit for bit, also the never-seen class 1 (no 0/0)
        for got, old in zip(new, state, strict=True):
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(old[k]))
    for k in (0, 2):
        assert float(new.count[k]) > float(state.count[k])
        assert not np.array_equal(np.asarray(new.mean[k]), np.asarray(state.mean[k]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in new)


def test_covariance_excludes_ignore_and_masked_pixels():
    rng = np.random.default_rng(19)
    batch = covariance_batch(rng, label_size=(3, 4))
    excluded = (batch["labels"] == 255) | ~batch["mask"]
    assert excluded.any() and (~excluded).any()
    features = batch["features"].copy()
    features[excluded] = np.nan  # must not even leak through 0 · NaN
    state = init_class_covariance(CLASSES, DIM)
    got = update_class_covariance(state, features, batch["labels"], mask=batch["mask"])
    clean = batch["features"].copy()
    clean[excluded] = 1e3
    want = update_class_covariance(state, clean, batch["labels"], mask=batch["mask"])
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    ref = fakd_ref.update_class_covariance(*state, batch["features"], batch["labels"],
                                           mask=batch["mask"])
    np.testing.assert_allclose(np.asarray(got.var), ref[1], rtol=1e-5, atol=1e-6)
    assert float(jnp.sum(got.count)) == (~excluded).sum()
    # ignore_label is configurable: with −1 as the ignore value, 255 is simply out of range.
    labels = np.where(batch["labels"] == 255, -1, batch["labels"])
    minus_one = update_class_covariance(state, features, labels, ignore_label=-1,
                                        mask=batch["mask"])
    np.testing.assert_array_equal(np.asarray(minus_one.var), np.asarray(got.var))


def test_covariance_features_get_no_gradient():
    rng = np.random.default_rng(20)
    batch = covariance_batch(rng)
    features = jnp.asarray(batch["features"], jnp.float32)
    g = jax.grad(lambda f: jnp.sum(update_class_covariance(
        init_class_covariance(CLASSES, DIM), f, batch["labels"]).var))(features)
    assert np.all(np.asarray(g) == 0)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [fakd_kd, fakd_cwd])
def test_bad_input_raises_naming_the_shapes(loss):
    a = jax_inputs(seed=0, masked=True)

    def call(**changes):
        return loss(**{**a, **changes}, strength=1.0)

    with pytest.raises(ValueError, match=r"classifier_kernel.*K = 4.*\(3, 3\)"):
        call(classifier_kernel=a["classifier_kernel"][:, :3])
    with pytest.raises(ValueError, match=r"classifier_kernel.*\(2, 1, 3, 4\)"):
        call(classifier_kernel=jnp.zeros((2, 1, DIM, CLASSES)))
    with pytest.raises(ValueError, match=r"variance.*\(4, 3\).*\(4, 2\)"):
        call(variance=a["variance"][:, :2])
    with pytest.raises(ValueError, match=r"variance.*\(4, 3\).*\(3, 4\)"):
        call(variance=a["variance"].T)
    with pytest.raises(ValueError, match=r"labels.*rank 3.*\(2, 5, 7, 1\)"):
        call(labels=a["labels"][..., None])
    with pytest.raises(ValueError, match=r"labels.*batch size 2.*\(1, 5, 7\)"):
        call(labels=a["labels"][:1])
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and \(2, 3, 4, 3\)"):
        call(teacher_logits=a["teacher_logits"][..., :3])
    with pytest.raises(ValueError, match="mask"):
        call(mask=a["mask"][0])
    with pytest.raises(ValueError, match="strength"):
        loss(**a, strength=-1.0)


def test_bad_options_raise():
    a = jax_inputs(seed=0)
    with pytest.raises(ValueError, match="temperature"):
        fakd_kd(**a, strength=1.0, temperature=0.0)
    with pytest.raises(ValueError, match="tau"):
        fakd_cwd(**a, strength=1.0, tau=-2.0)
    with pytest.raises(ValueError, match="c_norm"):
        fakd_cwd(**a, strength=1.0, c_norm=0)
    with pytest.raises(ValueError, match="images_per_chunk"):
        fakd_cwd(**a, strength=1.0, images_per_chunk=0)


def test_covariance_bad_input_raises_naming_the_shapes():
    rng = np.random.default_rng(21)
    batch = covariance_batch(rng)
    state = init_class_covariance(CLASSES, DIM)
    with pytest.raises(ValueError, match=r"features.*A = 3.*\(2, 3, 4, 2\)"):
        update_class_covariance(state, batch["features"][..., :2], batch["labels"])
    with pytest.raises(ValueError, match=r"features.*rank 4.*\(3, 4, 3\)"):
        update_class_covariance(state, batch["features"][0], batch["labels"])
    with pytest.raises(ValueError, match=r"labels.*rank 3.*\(5, 7\)"):
        update_class_covariance(state, batch["features"], batch["labels"][0])
    with pytest.raises(ValueError, match=r"state.*\(4, 3\), \(4, 2\) and \(4,\)"):
        update_class_covariance(state._replace(var=state.var[:, :2]), batch["features"],
                                batch["labels"])
    with pytest.raises(ValueError, match="mask"):
        update_class_covariance(state, batch["features"], batch["labels"], mask=batch["mask"][0])
