"""Af-DCD's losses and keep-masks (docs/methods.md §10): the loss contract, the float64 reference,
mathematical properties, and the PyTorch transcription of the official code, generator included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.losses.dense_contrast import (centre_third_keep_mask, feature_reconstruction,
                                         omni_contrast, random_keep_mask)
from kdjax.models.distill_modules import MaskedGenerator
from kdjax.ops import kernels
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference,
                                   relative_error, to_jax)
from tests.references import dense_contrast_ref

# Small omni-contrast settings: 8×8 maps pooled by 2 to 4×4, cut into 2×2 patches, 8 channels in 4
# groups of 2 (K = 16 vectors per patch).
SMALL = dict(groups=4, patch=(2, 2), pool=2)


def make_features(rng, batch, size=(8, 8), channels=8):
    shape = (batch, *size, channels)
    return {"generated": rng.normal(0, 1, shape), "teacher": rng.normal(0, 1, shape)}


def make_masked_features(rng, batch, size=(3, 4), channels=3):
    return {**make_features(rng, batch, size, channels), "mask": rng.random((batch, *size)) > 0.3}


def same_teacher(inputs):
    return {**inputs, "teacher": inputs["generated"].copy()}


def value(loss, inputs, **options):
    arrays = to_jax(inputs)
    return float(jax.jit(lambda a: loss(**a, **options))(arrays))


def gradient(loss, inputs, **options):
    arrays = to_jax(inputs)
    teacher = arrays.pop("teacher")
    return np.asarray(jax.jit(jax.grad(lambda g: loss(g, teacher, **options)))(
        arrays["generated"]))


# --------------------------------------------------------------------------------------------------
# The contract.

class TestFeatureReconstructionContract(LossContract):
    case = LossCase(loss=feature_reconstruction, make_inputs=make_masked_features,
                    student=("generated",), teacher=("teacher",), identical=same_teacher)


class TestOmniContrastContract(LossContract):
    case = LossCase(loss=omni_contrast, make_inputs=make_features, student=("generated",),
                    teacher=("teacher",), options=SMALL, mask=None, identical=None)


class TestOmniContrastInChunksContract(LossContract):
    """The same loss with its patches in chunks of 3 (a scan over 4 patches with a remainder)."""

    case = LossCase(loss=omni_contrast, make_inputs=make_features, student=("generated",),
                    teacher=("teacher",), options=dict(SMALL, patches_per_chunk=3), mask=None,
                    identical=None)


# --------------------------------------------------------------------------------------------------
# The float64 reference.

@pytest.mark.parametrize("masked", [False, True])
def test_feature_reconstruction_matches_reference(masked):
    inputs = make_masked_features(np.random.default_rng(1), 3)
    if masked:
        inputs["mask"][1] = False  # an image without a valid position leaves the denominator
    else:
        inputs.pop("mask")
    assert_matches_reference(feature_reconstruction, dense_contrast_ref.feature_reconstruction,
                             inputs, ("generated",))


@pytest.mark.parametrize("batch, size, channels, options", [
    (2, (4, 4), 4, dict(groups=2, patch=(2, 2), pool=0)),
    (1, (8, 8), 8, dict(groups=4, patch=(2, 2), pool=2)),
    (1, (9, 10), 4, dict(groups=2, patch=(2, 2), pool=4)),       # pooling drops a row and columns
    (2, (5, 7), 4, dict(groups=4, patch=2, pool=0, crop=(4, 4))),  # the CamVid path, small
    (1, (7, 9), 4, dict(groups=2, patch=(1, 2), pool=3, crop=(6, 8))),
    (1, (4, 8), 6, dict(groups=3, patch=(2, 4), pool=0, tau=0.5)),
    (1, (4, 4), 8, dict(groups=8, patch=(1, 1), pool=2, tau=1.0)),
])
def test_omni_contrast_matches_reference(batch, size, channels, options):
    inputs = make_features(np.random.default_rng(2), batch, size, channels)
    assert_matches_reference(omni_contrast, dense_contrast_ref.omni_contrast, inputs,
                             ("generated",), **options)


# --------------------------------------------------------------------------------------------------
# Properties of the omni-contrast term.

def test_omni_contrast_by_hand():
    # One 1×1 patch, two groups of one channel: row m's positive is t_m, its one negative t_{1−m}.
    g, t, tau = np.array([0.3, -1.2]), np.array([0.5, 0.4]), 0.2
    expected = 0.0
    for m in range(2):
        gap = (abs(g[m] - t[1 - m]) - abs(g[m] - t[m])) / tau
        expected += np.log1p(np.exp(-gap))
    inputs = {"generated": g.reshape(1, 1, 1, 2), "teacher": t.reshape(1, 1, 1, 2)}
    got = value(omni_contrast, inputs, groups=2, patch=1, pool=0, tau=tau)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_omni_contrast_is_positive_and_lowest_near_the_teacher():
    rng = np.random.default_rng(3)
    inputs = make_features(rng, 2)
    at_teacher = value(omni_contrast, same_teacher(inputs), **SMALL)
    near = value(omni_contrast, {**inputs, "generated": inputs["teacher"]
                                 + 0.05 * rng.normal(size=inputs["teacher"].shape)}, **SMALL)
    unrelated = value(omni_contrast, inputs, **SMALL)
    assert 0 < at_teacher < near < unrelated
    # At the teacher the gradient need not vanish (the negatives still pull), but it is finite.
    assert np.all(np.isfinite(gradient(omni_contrast, same_teacher(inputs), **SMALL)))


def test_one_group_has_no_negatives_and_gives_zero():
    inputs = make_features(np.random.default_rng(4), 2)
    assert value(omni_contrast, inputs, groups=1, patch=(2, 2), pool=2) == 0.0
    assert np.all(gradient(omni_contrast, inputs, groups=1, patch=(2, 2), pool=2) == 0)


def _permute_patches(x, order, patch=2):
    """Rearranges the patch×patch blocks of (N, H, W, C) by the permutation ``order``
    (row-major)."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(n, -1, patch, patch, c)[:, order]
    blocks = blocks.reshape(n, h // patch, w // patch, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, h, w, c)


def test_omni_contrast_invariances():
    rng = np.random.default_rng(5)
    inputs = make_features(rng, 3, size=(4, 4))
    options = dict(groups=4, patch=(2, 2), pool=0)
    base = value(omni_contrast, inputs, **options)

    def both(f):
        return {k: f(v) for k, v in inputs.items()}

    order = rng.permutation(4)
    cases = {
        "patches permuted": both(lambda x: _permute_patches(x, order)),
        "images permuted": both(lambda x: x[[2, 0, 1]]),
        "groups permuted": both(lambda x: x.reshape(3, 4, 4, 4, 2)[..., [3, 1, 0, 2], :]
                                .reshape(x.shape)),
        # Negatives compare channel d of one group with channel d of another, so the permutation
        # within the groups must be the same for all of them.
        "channels permuted alike in every group": both(lambda x: x[..., [1, 0, 3, 2, 5, 4, 7, 6]]),
        "common shift": both(lambda x: x + 2.5),
        "map tiled 2×2": both(lambda x: np.tile(x, (1, 2, 2, 1))),
    }
    for name, changed in cases.items():
        np.testing.assert_allclose(value(omni_contrast, changed, **options), base, rtol=1e-5,
                                   err_msg=name)
    # Not invariances: a different permutation in each group, or moving the student's positions
    # within their patch (positives are by position and group).
    apart = both(lambda x: x[..., [1, 0, 3, 2, 4, 5, 7, 6]])
    assert abs(value(omni_contrast, apart, **options) - base) > 1e-3
    swapped = both(lambda x: x.copy())
    swapped["generated"][:, [0, 1]] = swapped["generated"][:, [1, 0]]
    assert abs(value(omni_contrast, swapped, **options) - base) > 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_chunks_of_patches_change_nothing(chunk):
    inputs = make_features(np.random.default_rng(6), 2)
    np.testing.assert_allclose(value(omni_contrast, inputs, **SMALL, patches_per_chunk=chunk),
                               value(omni_contrast, inputs, **SMALL), rtol=1e-6)
    err = relative_error(gradient(omni_contrast, inputs, **SMALL, patches_per_chunk=chunk),
                         gradient(omni_contrast, inputs, **SMALL))
    assert err < 1e-6, err


def test_a_scratch_budget_changes_nothing_but_the_chunks():
    inputs = make_features(np.random.default_rng(6), 2)
    # One byte: a patch at a time.
    np.testing.assert_allclose(value(omni_contrast, inputs, **SMALL, scratch_bytes=1),
                               value(omni_contrast, inputs, **SMALL), rtol=1e-6)
    with pytest.raises(ValueError, match="scratch_bytes"):
        value(omni_contrast, inputs, **SMALL, scratch_bytes=0)


def test_omni_contrast_scratch_stays_within_the_budget():
    # 64 patches of K = 256 vectors of D = 16 (the Cityscapes shape at C = 256): one chunk's
    # (N, K, K, D) differences are 8 MB, so the CPU's budget of 16 MB takes two patches at a time.
    shape = (2, 32, 32, 256)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    step = jax.jit(jax.grad(lambda g, t: omni_contrast(g, t, pool=1, scratch_bytes=16 * 2**20)))
    compiled = step.lower(spec, spec).compile()
    whole_batch = 2 * 64 * 256 * 256 * 16 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < whole_batch / 8


def test_omni_contrast_matches_reference_across_blocks():
    # K = 24 vectors of D = 18 channels: more than one block of 16 in the distances' channel loop
    # and in the gradient's loop over the teacher's vectors, each with a remainder.
    inputs = make_features(np.random.default_rng(12), 1, (2, 3), 72)
    assert_matches_reference(omni_contrast, dense_contrast_ref.omni_contrast, inputs,
                             ("generated",), groups=4, patch=(2, 3), pool=0, tau=1.0)


@pytest.mark.parametrize("size, channels, options", [
    ((16, 16), 64, dict(groups=4, patch=(4, 4), pool=2, patches_per_chunk=1)),  # K = 64, D = 16
    ((9, 9), 40, dict(groups=2, patch=(4, 4), pool=0, crop=(8, 8))),      # the CamVid path, D = 20
])
def test_omni_contrast_same_in_both_forms_of_the_distances(monkeypatch, size, channels, options):
    """The CPU forms of :mod:`kdjax.ops.distances` (the default here) and the plain ones agree up
    to float32 rounding (the sums run in different orders)."""
    inputs = make_features(np.random.default_rng(13), 2, size, channels)
    cpu = value(omni_contrast, inputs, **options), gradient(omni_contrast, inputs, **options)
    monkeypatch.setattr(kernels, "cpu_forms", lambda: False)
    plain = value(omni_contrast, inputs, **options), gradient(omni_contrast, inputs, **options)
    np.testing.assert_allclose(cpu[0], plain[0], rtol=1e-6)
    err = relative_error(cpu[1], plain[1])
    assert err < 1e-5, err


def test_omni_contrast_bad_inputs():
    arrays = to_jax(make_features(np.random.default_rng(7), 1))
    g, t = arrays["generated"], arrays["teacher"]
    with pytest.raises(ValueError, match="same shape"):
        omni_contrast(g[..., :4], t)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        omni_contrast(g, t, groups=3)
    with pytest.raises(ValueError, match=r"patch 4×4 does not tile the 2×2 map after max-pooling"):
        omni_contrast(g, t, groups=4, pool=4)
    with pytest.raises(ValueError, match="crop=.* does not fit"):
        omni_contrast(g, t, groups=4, crop=(9, 4))
    with pytest.raises(ValueError, match="pool=16 is larger"):
        omni_contrast(g, t, groups=4, pool=16)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="pool must be"):
            omni_contrast(g, t, groups=4, pool=bad)
    with pytest.raises(ValueError, match="patch must be"):
        omni_contrast(g, t, groups=4, patch=(2, 0))
    with pytest.raises(ValueError, match="groups must be"):
        omni_contrast(g, t, groups=0)
    with pytest.raises(ValueError, match="tau"):
        omni_contrast(g, t, **SMALL, tau=0.0)
    with pytest.raises(ValueError, match="patches_per_chunk"):
        omni_contrast(g, t, **SMALL, patches_per_chunk=0)
    with pytest.raises(ValueError, match="rank 4"):
        omni_contrast(g[0], t[0], **SMALL)


# --------------------------------------------------------------------------------------------------
# Properties of the reconstruction term.

def test_feature_reconstruction_sums_and_divides_by_images():
    rng = np.random.default_rng(8)
    inputs = make_features(rng, 2, size=(3, 4), channels=5)
    expected = np.sum((inputs["generated"] - inputs["teacher"]) ** 2) / 2
    np.testing.assert_allclose(value(feature_reconstruction, inputs), expected, rtol=1e-6)


def test_feature_reconstruction_mask_keeps_nan_out():
    rng = np.random.default_rng(9)
    inputs = make_masked_features(rng, 2)
    mask = inputs["mask"]
    mask[0, 0, 0], mask[1, 2, 3] = False, False
    poisoned = {**inputs, "generated": inputs["generated"].copy()}
    poisoned["generated"][0, 0, 0] = np.nan
    poisoned["generated"][1, 2, 3] = np.inf
    np.testing.assert_allclose(value(feature_reconstruction, poisoned),
                               value(feature_reconstruction, inputs), rtol=1e-6)
    arrays = to_jax(poisoned)
    grad = jax.grad(lambda g: feature_reconstruction(g, arrays["teacher"], mask=arrays["mask"]))(
        arrays["generated"])
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)


def test_feature_reconstruction_bad_inputs():
    arrays = to_jax(make_masked_features(np.random.default_rng(10), 1))
    with pytest.raises(ValueError, match="same shape"):
        feature_reconstruction(arrays["generated"][..., :2], arrays["teacher"])
    with pytest.raises(ValueError, match="mask"):
        feature_reconstruction(arrays["generated"], arrays["teacher"], mask=arrays["mask"][0])


# --------------------------------------------------------------------------------------------------
# Keep-masks.

@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.1])
def test_random_keep_mask_drops_the_ratio(ratio):
    keep = np.asarray(random_keep_mask(jax.random.key(0), (4, 64, 64), ratio))
    assert keep.dtype == bool and keep.shape == (4, 64, 64)
    # 16384 independent positions: the kept fraction's standard deviation is below 0.004.
    assert abs(keep.mean() - (1 - ratio)) < 0.02
    for image in keep:
        assert abs(image.mean() - (1 - ratio)) < 0.04
    assert not np.array_equal(keep[0], keep[1])               # each image draws its own


def test_random_keep_mask_is_a_function_of_the_key():
    a = random_keep_mask(jax.random.key(1), (2, 8, 8))
    np.testing.assert_array_equal(a, random_keep_mask(jax.random.key(1), (2, 8, 8)))
    np.testing.assert_array_equal(a, jax.jit(lambda k: random_keep_mask(k, (2, 8, 8)))(
        jax.random.key(1)))
    assert not np.array_equal(a, random_keep_mask(jax.random.key(2), (2, 8, 8)))


def test_random_keep_mask_extremes_and_errors():
    key = jax.random.key(3)
    assert np.all(random_keep_mask(key, (2, 5, 5), 0.0))
    assert not np.any(random_keep_mask(key, (2, 5, 5), 1.0))
    for bad in (-0.1, 1.5, True, "0.75"):
        with pytest.raises(ValueError, match="ratio"):
            random_keep_mask(key, (2, 5, 5), bad)
    for bad in ((2, 5), (2, 0, 5), (2, 5, 5.0)):
        with pytest.raises(ValueError, match="shape_nhw"):
            random_keep_mask(key, bad)


def test_centre_third_keep_mask_layout():
    keep = np.asarray(centre_third_keep_mask((2, 6, 9)))
    expected = np.ones((6, 9), bool)
    expected[2:4, 3:6] = False
    assert keep.shape == (2, 6, 9) and keep.dtype == bool
    np.testing.assert_array_equal(keep[0], expected)
    np.testing.assert_array_equal(keep[1], expected)
    # ⌊H/3⌋ .. ⌊2H/3⌋ − 1: 7 rows drop rows 2..3; 2 rows drop row 0; 1 row drops nothing.
    assert np.flatnonzero(~np.asarray(centre_third_keep_mask((1, 7, 3)))[0].all(axis=1)).tolist() \
        == [2, 3]
    assert np.flatnonzero(~np.asarray(centre_third_keep_mask((1, 2, 3)))[0].all(axis=1)).tolist() \
        == [0]
    assert np.all(centre_third_keep_mask((1, 1, 1)))


# --------------------------------------------------------------------------------------------------
# The PyTorch transcription of the official code.

def _nchw(torch, x, requires_grad=False):
    return torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2),
                        requires_grad=requires_grad)


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
@pytest.mark.parametrize("size, channels, options", [
    ((16, 16), 32, dict(groups=16, patch=(4, 4), pool=2)),   # the official layout, smaller maps
    ((16, 16), 8, dict(groups=4, patch=(2, 2), pool=4)),
    ((9, 9), 8, dict(groups=2, patch=(4, 4), pool=0, crop=(8, 8))),
    ((8, 8), 12, dict(groups=3, patch=(2, 4), pool=0, tau=0.3)),
])
def test_omni_contrast_matches_pytorch(size, channels, options):
    torch = pytest.importorskip("torch")
    from tests.torch_reference import dense_contrast as ref

    inputs = make_features(np.random.default_rng(11), 2, size, channels)
    generated = _nchw(torch, inputs["generated"], requires_grad=True)
    expected = ref.omni_contrast_sum(generated, _nchw(torch, inputs["teacher"]), **options) / 2
    expected.backward()
    np.testing.assert_allclose(value(omni_contrast, inputs, **options), expected.item(), rtol=1e-5)
    err = relative_error(gradient(omni_contrast, inputs, **options), _nhwc(generated.grad))
    assert err < 1e-5, err


@pytest.mark.torch
def test_feature_reconstruction_and_masks_match_pytorch():
    torch = pytest.importorskip("torch")
    from tests.torch_reference import dense_contrast as ref

    inputs = make_features(np.random.default_rng(12), 3, (5, 6), 4)
    expected = torch.nn.functional.mse_loss(_nchw(torch, inputs["generated"]),
                                            _nchw(torch, inputs["teacher"]), reduction="sum") / 3
    np.testing.assert_allclose(value(feature_reconstruction, inputs), expected.item(), rtol=1e-6)
    for h, w in ((6, 9), (7, 5), (2, 2), (1, 4), (64, 128)):
        np.testing.assert_array_equal(centre_third_keep_mask((2, h, w)),
                                      ref.centre_third_keep(2, h, w).numpy())
    drawn = ref.random_keep(4, 64, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert abs(drawn.float().mean().item() - 0.25) < 0.02       # the original keeps 1 − ratio


def _load_generator(generator, state_dict):
    """Copies the original's parameters (names of tests/torch_reference/dense_contrast.py) into
    a MaskedGenerator."""
    names = {"align": "align", "projetor.0": "conv1", "projetor.2": "conv2",
             "projetor.block_1.0": "block1", "projetor.block_2.0": "block2",
             "projetor.adpator_1": "adaptor1", "projetor.adpator_2": "adaptor2"}
    loaded = set()
    for prefix, attr in names.items():
        if f"{prefix}.weight" not in state_dict:
            continue
        conv = getattr(generator, attr)
        weight = state_dict[f"{prefix}.weight"].numpy()
        conv.kernel[...] = jnp.asarray(weight.transpose(2, 3, 1, 0), jnp.float32)
        conv.bias[...] = jnp.asarray(state_dict[f"{prefix}.bias"].numpy(), jnp.float32)
        loaded |= {f"{prefix}.weight", f"{prefix}.bias"}
    assert loaded == set(state_dict)
    return {attr: prefix for prefix, attr in names.items()}


@pytest.mark.torch
@pytest.mark.parametrize("enhanced, student_channels, centre", [
    (False, 8, False), (True, 8, False), (False, 32, False), (True, 32, False),
    # On 32×32 the centre third (rows and columns 10..20) holds pooling windows whose generated
    # values all equal one constant: tied maxima, which PyTorch and JAX route differently.
    (False, 8, True)])
def test_generator_and_losses_match_pytorch(enhanced, student_channels, centre):
    """align → keep-mask → projector → both losses, value and gradients (student feature and every
    generator parameter), against the official formulas in float64."""
    torch = pytest.importorskip("torch")
    from tests.torch_reference import dense_contrast as ref

    teacher_channels, options = 32, dict(groups=16, patch=(4, 4), pool=2)
    torch.manual_seed(0)
    criterion = ref.AfDcdCriterion(student_channels, teacher_channels, enhanced=enhanced,
                                   **options).double()
    generator = MaskedGenerator(student_channels, teacher_channels, enhanced=enhanced,
                                rngs=nnx.Rngs(0))
    names = _load_generator(generator, criterion.state_dict())
    assert (generator.align is None) == (student_channels == teacher_channels)

    rng = np.random.default_rng(13)
    size = 32 if centre else 16
    feat_s = rng.normal(0, 1, (2, size, size, student_channels))
    feat_t = np.maximum(rng.normal(0, 1, (2, size, size, teacher_channels)), 0)
    shape = (2, size, size)
    keep = np.array(centre_third_keep_mask(shape) if centre
                    else random_keep_mask(jax.random.key(4), shape))

    graphdef, params = nnx.split(generator)

    def losses(params, x, which):
        generated = nnx.merge(graphdef, params)(x, jnp.asarray(keep), train=True)
        parts = (feature_reconstruction(generated, feat_t), omni_contrast(generated, feat_t,
                                                                           **options))
        return parts[which]

    for which in (0, 1):
        criterion.zero_grad()
        x = _nchw(torch, feat_s, requires_grad=True)
        expected = criterion(x, _nchw(torch, feat_t), torch.from_numpy(keep))[which]
        expected.backward()
        got, (param_grads, x_grad) = jax.value_and_grad(losses, argnums=(0, 1))(
            params, jnp.asarray(feat_s, jnp.float32), which)
        np.testing.assert_allclose(float(got), expected.item(), rtol=1e-5)
        assert relative_error(x_grad, _nhwc(x.grad)) < 1e-4
        torch_grads = {name: p.grad.numpy() for name, p in criterion.named_parameters()}
        for attr, prefix in names.items():
            if getattr(generator, attr) is None:
                continue
            conv_grads = param_grads[attr]
            kernel = np.asarray(conv_grads["kernel"][...]).transpose(3, 2, 0, 1)
            assert relative_error(kernel, torch_grads[f"{prefix}.weight"]) < 1e-4, (which, attr)
            assert relative_error(conv_grads["bias"][...], torch_grads[f"{prefix}.bias"]) < 1e-4
