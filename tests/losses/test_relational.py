import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses.relational import cirkd_minibatch, pixel_feature_similarity, skd_pairwise
from tests.losses.contract import (LossCase, LossContract, assert_matches_reference,
                                   dot_count, numeric_grad, relative_error, to_jax)
from tests.references import relational_ref

LOSSES = {
    "pfs": (pixel_feature_similarity, relational_ref.pixel_feature_similarity),
    "skd": (skd_pairwise, relational_ref.skd_pairwise),
    "cirkd": (cirkd_minibatch, relational_ref.cirkd_minibatch),
}


def make_inputs(rng, batch, size=(3, 4), channels=(3, 4)):
    """Student and teacher with different channel counts: only N, H, W must agree."""
    return {
        "student_feat": rng.normal(0, 1, (batch, *size, channels[0])),
        "teacher_feat": rng.normal(0, 1, (batch, *size, channels[1])),
        "mask": rng.random((batch, *size)) > 0.3,
    }


def make_odd_inputs(rng, batch):
    """A 3×5 map: 2-windows leave partial last windows along both axes (ceil mode)."""
    return make_inputs(rng, batch, size=(3, 5))


def same_teacher(inputs):
    return {**inputs, "teacher_feat": inputs["student_feat"].copy()}


# Compilation dominates the run time of these tests, so they call the losses jitted, value and
# gradient in one compiled function, and share shapes and options where they can (the contract
# classes keep the eager path covered).
STATIC_OPTIONS = ("pool", "norm", "form", "block_size", "tau", "group_size")


@functools.cache
def jitted(loss):
    options = set(STATIC_OPTIONS) & set(inspect.signature(loss).parameters)
    return jax.jit(loss, static_argnames=tuple(options))


@functools.partial(jax.jit, static_argnames=("loss", "options"))
def _value_and_grad(loss, options, student, teacher, mask):
    return jax.value_and_grad(lambda s: loss(s, teacher, mask=mask, **dict(options)))(student)


def value_and_grad(loss, arrays, **options):
    """Loss value and its gradient with respect to the student feature."""
    return _value_and_grad(loss, tuple(sorted(options.items())), arrays["student_feat"],
                           arrays["teacher_feat"], arrays.get("mask"))


def call(loss, arrays, **options):
    return value_and_grad(loss, arrays, **options)[0]


def student_grad(loss, arrays, **options):
    return value_and_grad(loss, arrays, **options)[1]


# --------------------------------------------------------------------------------------------------
# The contract.

class TestPixelFeatureSimilarityContract(LossContract):
    case = LossCase(loss=pixel_feature_similarity, make_inputs=make_inputs,
                    student=("student_feat",), teacher=("teacher_feat",), identical=same_teacher)


class TestSKDPairwiseContract(LossContract):
    case = LossCase(loss=skd_pairwise, make_inputs=make_odd_inputs, student=("student_feat",),
                    teacher=("teacher_feat",), identical=same_teacher)


class TestCIRKDMiniBatchContract(LossContract):
    case = LossCase(loss=cirkd_minibatch, make_inputs=make_inputs, student=("student_feat",),
                    teacher=("teacher_feat",), options={"group_size": 2}, identical=same_teacher)


# --------------------------------------------------------------------------------------------------
# Float64 references for every code-version option.

def with_mask(inputs, masked):
    """Drops the mask, or keeps it with the second image fully masked (it must leave the mean)."""
    inputs = dict(inputs)
    if masked:
        inputs["mask"] = inputs["mask"].copy()
        inputs["mask"][1] = False
    else:
        inputs.pop("mask")
    return inputs


@pytest.mark.parametrize("form", ["gram", "pairs"])
@pytest.mark.parametrize("pool, masked", [(1, False), (2, True), ((2, 3), False)])
def test_pfs_matches_reference(pool, masked, form):
    inputs = with_mask(make_odd_inputs(np.random.default_rng(1), 2), masked)
    assert_matches_reference(jitted(pixel_feature_similarity),
                             relational_ref.pixel_feature_similarity, inputs, ("student_feat",),
                             pool=pool, form=form)


@pytest.mark.parametrize("form", ["gram", "pairs"])
@pytest.mark.parametrize("pool, masked", [(1, True), (2, False), ("half", True)])
def test_skd_matches_reference(pool, masked, form):
    inputs = with_mask(make_inputs(np.random.default_rng(2), 2, size=(5, 7), channels=(2, 3)),
                       masked)
    assert_matches_reference(jitted(skd_pairwise), relational_ref.skd_pairwise, inputs,
                             ("student_feat",), pool=pool, form=form)


@pytest.mark.parametrize("pool, masked, form", [("half", False, "pairs"), (2, True, "gram")])
def test_skd_detached_norm_matches_reference_with_frozen_norm(pool, masked, form):
    """norm='detached': the value is the reference's; the gradient is that of the reference with
    the student's norms frozen at the evaluation point (not the gradient of the value)."""
    inputs = with_mask(make_inputs(np.random.default_rng(3), 2, size=(5, 7), channels=(2, 3)),
                       masked)
    arrays = to_jax(inputs)
    options = {"pool": pool, "norm": "detached", "form": form}
    value, got = value_and_grad(skd_pairwise, arrays, **options)
    np.testing.assert_allclose(float(value), relational_ref.skd_pairwise(**inputs, **options),
                               rtol=1e-5)
    x0 = inputs["student_feat"]
    frozen_norm = numeric_grad(
        lambda x: relational_ref.skd_pairwise(**{**inputs, "student_feat": x}, **options,
                                              student_norm_at=x0), x0)
    assert relative_error(got, frozen_norm) < 1e-5
    if pool == "half":
        # The check tells the variants apart: the F.normalize gradient is far from this one.
        full = student_grad(skd_pairwise, arrays, pool=pool, norm="normalize", form=form)
        assert relative_error(full, frozen_norm) > 1e-2


@pytest.mark.parametrize("options, masked", [({"group_size": 1}, True),
                                             ({"group_size": 2, "tau": 0.5}, False),
                                             ({"group_size": None}, True)])
def test_cirkd_matches_reference(options, masked):
    inputs = with_mask(make_inputs(np.random.default_rng(4), 4, size=(2, 3)), masked)
    assert_matches_reference(jitted(cirkd_minibatch), relational_ref.cirkd_minibatch, inputs,
                             ("student_feat",), **options)


# --------------------------------------------------------------------------------------------------
# Blockwise form == dense form, and its memory.

@pytest.mark.parametrize("name, options, block_size, masks", [
    ("pfs", {"pool": 2, "form": "pairs"}, 5, (False, True)),  # P = 12 cells: the last block is padded
    ("skd", {"pool": "half", "norm": "detached", "form": "pairs"}, 16, (True,)),  # a block > P = 9
    ("cirkd", {"group_size": None}, 8, (False, True))])  # P = 35
def test_blockwise_equals_dense(name, options, block_size, masks):
    loss, _ = LOSSES[name]
    for masked in masks:
        inputs = with_mask(make_inputs(np.random.default_rng(6), 4, size=(5, 7)), masked)
        arrays = to_jax(inputs)
        dense, dense_grad = value_and_grad(loss, arrays, **options)
        blocked, blocked_grad = value_and_grad(loss, arrays, block_size=block_size, **options)
        np.testing.assert_allclose(float(blocked), float(dense), rtol=1e-5)
        assert relative_error(blocked_grad, dense_grad) < 1e-5
        assert np.any(np.asarray(dense_grad) != 0)


@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize("name, options, gradient_products", [
    ("cirkd", {}, 2),                     # a row softmax: the rows' and the columns' shares
    ("pfs", {"form": "pairs"}, 1),        # symmetric: twice the rows' share
    ("skd", {"pool": 1, "form": "pairs"}, 1)])
def test_gradient_products_beyond_the_maps(block_size, name, options, gradient_products):
    # The maps A^S and A^T are two products per block; the gradient w.r.t. X^S is formed beside
    # them, and the value alone forms none of it.
    loss_fn, _ = LOSSES[name]
    arrays = to_jax(make_inputs(np.random.default_rng(6), 2, size=(5, 7)))
    student, teacher = arrays["student_feat"], arrays["teacher_feat"]

    def loss(s):
        return loss_fn(s, teacher, block_size=block_size, **options)

    assert dot_count(loss, student) == 2
    assert dot_count(jax.value_and_grad(loss), student) == 2 + gradient_products


def temp_bytes(loss, side, batch=2, **options):
    """Compiled temporary memory of the student gradient for a (batch, side, side, 4) feature."""
    feat = jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32)
    step = jax.jit(jax.grad(lambda s, t: loss(s, t, **options)))
    return step.lower(feat, feat).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name, options", [  # SKD with pool=1 is the PFS computation
    ("pfs", {"form": "pairs"}), ("cirkd", {})])
def test_blockwise_memory_grows_linearly_with_pixels(name, options):
    loss, _ = LOSSES[name]
    blocked = [temp_bytes(loss, side, block_size=64, **options)
               for side in (16, 32, 64)]  # P = 256, 1024, 4096
    dense = [temp_bytes(loss, side, **options) for side in (32, 64)]
    # Quadrupling P multiplies O(P·block) memory by ~4 and O(P²) memory by ~16.
    for small, large in zip(blocked, blocked[1:]):
        assert large / small < 6, blocked
    assert dense[1] / dense[0] > 12, dense
    assert dense[1] > 10 * blocked[2], (dense, blocked)


@pytest.mark.parametrize("name, options", [("pfs", {"form": "pairs"}), ("cirkd", {})])
def test_blockwise_memory_does_not_grow_with_the_number_of_groups(name, options):
    loss, _ = LOSSES[name]
    # P = 1024: a block's maps hold 64 × 1024 entries per image pair, the features 4 per pixel.
    one, eight = (temp_bytes(loss, 32, batch=batch, block_size=64, **options) for batch in (2, 16))
    # The groups take turns: 8× the groups adds their features and gradients, not 8× the maps.
    assert eight < 2 * one, (one, eight)


def test_gram_form_memory_grows_linearly_with_pixels():
    gram = [temp_bytes(pixel_feature_similarity, side, form="gram") for side in (32, 64, 128)]
    for small, large in zip(gram, gram[1:]):
        assert large / small < 6, gram
    # At P = 16384 the pairs form's two P×P maps alone would take 2 GB.
    assert gram[-1] < 64 * 2 ** 20, gram


# --------------------------------------------------------------------------------------------------
# Gram form == pairs form, and the automatic choice between them.

@pytest.mark.parametrize("name, options", [
    ("pfs", {}), ("pfs", {"pool": 2}), ("skd", {}), ("skd", {"norm": "detached", "pool": 1})])
def test_gram_form_equals_pairs_form(name, options):
    loss, _ = LOSSES[name]
    for masked in (False, True):
        # Larger maps than the reference tests: the forms' cancellation grows with P.
        inputs = with_mask(make_inputs(np.random.default_rng(16), 4, size=(9, 11),
                                       channels=(5, 6)), masked)
        arrays = to_jax(inputs)
        pairs, pairs_grad = value_and_grad(loss, arrays, form="pairs", **options)
        gram, gram_grad = value_and_grad(loss, arrays, form="gram", **options)
        np.testing.assert_allclose(float(gram), float(pairs), rtol=1e-5)
        assert relative_error(gram_grad, pairs_grad) < 1e-5
        assert np.any(np.asarray(pairs_grad) != 0)


def test_gram_form_is_zero_at_identical_inputs_of_head_size():
    """The three Gram terms cancel exactly: same dots on the same values."""
    rng = np.random.default_rng(17)
    feat = jnp.asarray(np.maximum(rng.normal(size=(2, 16, 32, 64)), 0), jnp.float32)
    value, grad = value_and_grad(pixel_feature_similarity,
                                 {"student_feat": feat, "teacher_feat": feat}, form="gram")
    assert float(value) == 0.0
    assert float(jnp.max(jnp.abs(grad))) < 1e-9


@pytest.mark.parametrize("name, options, shapes, expected", [
    # Head features: C = 128 / 256 channels on 32×64 pixels.
    ("pfs", {}, ((2, 32, 64, 128), (2, 32, 64, 256)), "gram"),
    # Official SKD pooling leaves 3×3 cells: 9² pairs are cheaper than 512² Gram entries.
    ("skd", {"pool": "half"}, ((2, 65, 65, 512), (2, 65, 65, 512)), "pairs"),
    ("skd", {}, ((2, 64, 64, 128), (2, 64, 64, 128)), "gram")])
def test_auto_form_takes_the_cheaper_form(name, options, shapes, expected):
    loss, _ = LOSSES[name]
    student, teacher = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)

    def program(form):
        return str(jax.make_jaxpr(functools.partial(loss, form=form, **options))(student, teacher))

    assert program("auto") == program(expected)
    assert program("auto") != program({"gram": "pairs", "pairs": "gram"}[expected])


# --------------------------------------------------------------------------------------------------
# Mathematical properties.

@pytest.mark.parametrize("name, options", [
    ("pfs", {}), ("skd", {"pool": 1}), ("skd", {"pool": 1, "norm": "detached"}), ("cirkd", {})])
def test_invariant_to_per_pixel_positive_rescaling(name, options):
    loss, _ = LOSSES[name]
    rng = np.random.default_rng(8)
    arrays = to_jax(make_inputs(rng, 2))
    base = call(loss, arrays, **options)
    assert float(base) > 1e-3
    scale_s = rng.uniform(0.1, 10, (2, 3, 4, 1)).astype(np.float32)
    scale_t = rng.uniform(0.1, 10, (2, 3, 4, 1)).astype(np.float32)
    scaled = {**arrays, "student_feat": arrays["student_feat"] * scale_s,
              "teacher_feat": arrays["teacher_feat"] * scale_t}
    np.testing.assert_allclose(float(call(loss, scaled, **options)), float(base), rtol=1e-5)
    # A negative scale flips a pixel's vector and so its affinities: not an invariance.
    flipped = {**arrays, "student_feat": arrays["student_feat"] * np.sign(scale_s - 5)}
    assert abs(float(call(loss, flipped, **options)) - float(base)) > 1e-3


@pytest.mark.parametrize("name", ["pfs", "skd"])
def test_pooled_invariant_to_per_cell_positive_rescaling(name):
    """Average and max pooling commute with a positive scale that is constant over each cell."""
    loss, _ = LOSSES[name]
    rng = np.random.default_rng(9)
    arrays = to_jax(make_odd_inputs(rng, 2))
    cells = rng.uniform(0.1, 10, (2, 2, 3, 1))
    scale = np.repeat(np.repeat(cells, 2, axis=1), 2, axis=2)[:, :3, :5].astype(np.float32)
    scaled = {**arrays, "student_feat": arrays["student_feat"] * scale}
    np.testing.assert_allclose(float(call(loss, scaled, pool=2)),
                               float(call(loss, arrays, pool=2)), rtol=1e-5)


@pytest.mark.parametrize("name", ["pfs", "cirkd"])
def test_invariant_to_channel_rotations_and_pixel_permutations(name):
    loss, _ = LOSSES[name]
    rng = np.random.default_rng(10)
    arrays = to_jax(make_inputs(rng, 2))
    base = float(call(loss, arrays))
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotated = {**arrays, "student_feat": arrays["student_feat"] @ rotation.astype(np.float32)}
    np.testing.assert_allclose(float(call(loss, rotated)), base, rtol=1e-5)
    # The same pixel permutation in both maps (and in the mask) permutes the rows and columns of A.
    order = rng.permutation(12)

    def permute(x):
        return x.reshape(2, 12, *x.shape[3:])[:, order].reshape(x.shape)

    permuted = {k: permute(v) for k, v in arrays.items()}
    np.testing.assert_allclose(float(call(loss, permuted)), base, rtol=1e-5)


def test_pfs_reaches_four_at_opposite_similarities():
    # Opposite unit vectors at two pixels in S, equal ones in T: (A^S − A^T)² = (−1 − 1)² = 4 at
    # the two off-diagonal pairs, 0 on the diagonal.
    s = np.zeros((1, 1, 2, 2), np.float32)
    s[0, 0, 0, 0], s[0, 0, 1, 0] = 1.0, -1.0
    t = np.zeros((1, 1, 2, 2), np.float32)
    t[0, 0, :, 0] = 1.0
    value = call(pixel_feature_similarity, {"student_feat": s, "teacher_feat": t})
    np.testing.assert_allclose(float(value), 2 * 4 / 4, rtol=1e-6)


def test_skd_half_pooling_turns_65_by_65_into_3_by_3_cells():
    rng = np.random.default_rng(12)
    s, t = rng.normal(size=(1, 65, 65, 2)), rng.normal(size=(1, 65, 65, 2))

    def max_cells(x):  # kernel = stride = int(0.5·65) = 32: windows [0, 32), [32, 64), [64, 65)
        edges = [0, 32, 64, 65]
        return np.array([[[x[0, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].max(axis=(0, 1))
                           for j in range(3)] for i in range(3)]])

    got = jitted(skd_pairwise)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                               pool="half")
    want = jitted(skd_pairwise)(jnp.asarray(max_cells(s), jnp.float32),
                                jnp.asarray(max_cells(t), jnp.float32), pool=1)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_cirkd_groups():
    rng = np.random.default_rng(13)
    arrays = to_jax(make_inputs(rng, 4))
    arrays.pop("mask")  # with a mask, groups weigh by their valid rows (see the reference tests)
    loss = jitted(cirkd_minibatch)

    def part(images, **options):
        return float(loss(arrays["student_feat"][images], arrays["teacher_feat"][images],
                          **options))

    # group_size 2 is the mean over the consecutive pairs of images (one GPU each in CIRKD) ...
    np.testing.assert_allclose(part(slice(None), group_size=2),
                               (part(slice(0, 2)) + part(slice(2, 4))) / 2, rtol=1e-5)
    # ... group_size 1 keeps the self-pairs only, None pairs every image with every other.
    np.testing.assert_allclose(part(slice(None), group_size=1),
                               np.mean([part(slice(i, i + 1), group_size=1) for i in range(4)]),
                               rtol=1e-5)
    assert abs(part(slice(None), group_size=None) - part(slice(None), group_size=2)) > 1e-3
    np.testing.assert_allclose(part(slice(0, 2), group_size=None), part(slice(0, 2)), rtol=1e-6)
    # Within a group, the order of the images does not matter; across groups it does.
    np.testing.assert_allclose(part(np.array([1, 0, 3, 2])), part(slice(None)), rtol=1e-5)
    np.testing.assert_allclose(part(np.array([3, 1, 2, 0]), group_size=None),
                               part(slice(None), group_size=None), rtol=1e-5)
    assert abs(part(np.array([0, 2, 1, 3])) - part(slice(None))) > 1e-3


# --------------------------------------------------------------------------------------------------
# Masks and degenerate pixels.

@pytest.mark.parametrize("name, options", [
    ("pfs", {"pool": 2, "form": "pairs", "block_size": 4}), ("pfs", {"form": "gram"}),
    ("skd", {"norm": "detached", "form": "gram"}), ("skd", {"form": "pairs"}),
    ("cirkd", {"block_size": 4})])
def test_masked_pixels_do_not_matter(name, options):
    loss, _ = LOSSES[name]
    inputs = make_odd_inputs(np.random.default_rng(14), 2)
    arrays = to_jax(inputs)
    base, _ = value_and_grad(loss, arrays, **options)
    # Masked pixels holding NaN / huge values change neither the value nor the gradient.
    hidden = ~inputs["mask"][..., None]
    garbage = {**arrays,
               "student_feat": jnp.where(hidden, jnp.nan, arrays["student_feat"]),
               "teacher_feat": jnp.where(hidden, 1e6, arrays["teacher_feat"])}
    value, grad = value_and_grad(loss, garbage, **options)
    np.testing.assert_allclose(float(value), float(base), rtol=1e-5)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[np.broadcast_to(hidden, grad.shape)] == 0)
    # An all-true mask is the unmasked loss; an all-false one gives 0 with a zero gradient (the
    # contract's check, here for the pooled, official and blockwise forms).
    full, _ = value_and_grad(loss, {**arrays, "mask": jnp.ones_like(arrays["mask"])}, **options)
    unmasked, _ = value_and_grad(loss, {**arrays, "mask": None}, **options)
    np.testing.assert_allclose(float(full), float(unmasked), rtol=1e-6)
    empty, grad = value_and_grad(loss, {**arrays, "mask": jnp.zeros_like(arrays["mask"])},
                                 **options)
    assert float(empty) == 0.0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("name", ["pfs", "skd", "cirkd"])
def test_all_zero_pixels_keep_a_finite_gradient(name):
    """A pixel a ReLU switched off has a zero vector: F.normalize maps it to 0, and the gradient
    must stay finite there."""
    loss, _ = LOSSES[name]
    inputs = make_inputs(np.random.default_rng(15), 2)
    inputs["student_feat"][0, 1, 2] = 0.0
    inputs["teacher_feat"][1, 0, :2] = 0.0
    options = {"pool": 1} if name == "skd" else {}
    value, grad = value_and_grad(loss, to_jax(inputs), **options)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


# --------------------------------------------------------------------------------------------------
# PyTorch parity (NCHW, float64).

def torch_inputs(torch, inputs):
    nchw = {k: torch.from_numpy(inputs[k]).permute(0, 3, 1, 2).contiguous()
            for k in ("student_feat", "teacher_feat")}
    nchw["student_feat"].requires_grad_(True)
    return nchw["student_feat"], nchw["teacher_feat"]


def assert_torch_parity(loss_value, student_nchw, arrays, jax_loss, **options):
    loss_value.backward()
    want_grad = student_nchw.grad.permute(0, 2, 3, 1).numpy()
    got, got_grad = value_and_grad(jax_loss, {**arrays, "mask": None}, **options)
    np.testing.assert_allclose(float(got), loss_value.item(), rtol=1e-5)
    assert relative_error(got_grad, want_grad) < 1e-5


@pytest.mark.torch
def test_skd_matches_cirkd_pytorch_code():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs = make_inputs(np.random.default_rng(16), 2, size=(5, 7))
    s, t = torch_inputs(torch, inputs)

    def affinity(f):  # CIRKD losses/skd.py: max-pool 2 (ceil), F.normalize over C, f̂ᵀf̂
        f = F.normalize(F.max_pool2d(f, 2, 2, ceil_mode=True), p=2, dim=1).flatten(2)
        return torch.bmm(f.transpose(1, 2), f)

    value = ((affinity(s) - affinity(t)) ** 2).mean()
    assert_torch_parity(value, s, to_jax(inputs), skd_pairwise)


@pytest.mark.torch
def test_skd_matches_official_pytorch_code():
    torch = pytest.importorskip("torch")
    inputs = make_inputs(np.random.default_rng(17), 2, size=(5, 7))
    s, t = torch_inputs(torch, inputs)
    h, w = s.shape[2:]
    pool = torch.nn.MaxPool2d((int(0.5 * h), int(0.5 * w)), (int(0.5 * h), int(0.5 * w)),
                              ceil_mode=True)

    def affinity(f):  # official SKD: the norm is detached, + 1e-8
        f = pool(f)
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8).detach()
        f = f.flatten(2)
        return torch.einsum("icm,icn->imn", f, f)

    n, p = s.shape[0], affinity(t).shape[-1]
    value = ((affinity(t) - affinity(s)) ** 2).sum() / p**2 / n
    assert_torch_parity(value, s, to_jax(inputs), skd_pairwise, pool="half", norm="detached")


@pytest.mark.torch
def test_pfs_pooling_matches_pytorch_avg_pool():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs = make_inputs(np.random.default_rng(18), 2, size=(3, 5))
    s, t = torch_inputs(torch, inputs)

    def affinity(f):  # ceil-mode avg pool: partial windows divide by their in-bounds count
        f = F.normalize(F.avg_pool2d(f, 2, 2, ceil_mode=True), dim=1).flatten(2)
        return torch.bmm(f.transpose(1, 2), f)

    value = ((affinity(s) - affinity(t)) ** 2).mean()
    assert_torch_parity(value, s, to_jax(inputs), pixel_feature_similarity, pool=2)


@pytest.mark.torch
@pytest.mark.parametrize("group_size", [2, None])
def test_cirkd_matches_pytorch_minibatch_formula(group_size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs = make_inputs(np.random.default_rng(19), 4)
    s, t = torch_inputs(torch, inputs)
    tau, b = 0.1, group_size or 4

    def minibatch(fs, ft):  # cirkd_mini_batch.py on one GPU's B images
        fs, ft = F.normalize(fs, dim=1).flatten(2), F.normalize(ft, dim=1).flatten(2)
        total = 0.0
        for i in range(len(fs)):
            for j in range(len(fs)):
                log_p_s = F.log_softmax(fs[i].T @ fs[j] / tau, dim=1)
                p_t = F.softmax(ft[i].T @ ft[j] / tau, dim=1)
                total = total + F.kl_div(log_p_s, p_t, reduction="batchmean")
        return total / len(fs) ** 2

    # DDP averages the per-GPU losses' gradients: the mean over groups.
    value = sum(minibatch(s[g:g + b], t[g:g + b]) for g in range(0, 4, b)) / (4 // b)
    assert_torch_parity(value, s, to_jax(inputs), cirkd_minibatch, group_size=group_size)


# --------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_raises():
    arrays = to_jax(make_inputs(np.random.default_rng(0), 2))
    s, t, m = arrays["student_feat"], arrays["teacher_feat"], arrays["mask"]
    for loss in (pixel_feature_similarity, skd_pairwise, cirkd_minibatch):
        with pytest.raises(ValueError, match=r"student_feat and teacher_feat .*\(2, 3, 4, 3\)"):
            loss(s, t[:, :2])
        with pytest.raises(ValueError, match=r"teacher_feat must have rank 4.*\(2, 3, 4\)"):
            loss(s, t[..., 0])
        with pytest.raises(ValueError, match=r"student_feat must have rank 4"):
            loss(s[0], t)
        with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 3, 4\).*\(3, 4\)"):
            loss(s, t, mask=m[0])
        for block_size in (0, 2.0, True):
            with pytest.raises(ValueError, match="block_size"):
                loss(s, t, block_size=block_size)
    for pool in (0, "half", (2,), 1.5):
        with pytest.raises(ValueError, match="pool"):
            pixel_feature_similarity(s, t, pool=pool)
    for pool in (0, "quarter", (2, 0)):
        with pytest.raises(ValueError, match="pool"):
            skd_pairwise(s, t, pool=pool)
    with pytest.raises(ValueError, match=r"pool='half'.*1×4"):
        skd_pairwise(s[:, :1], t[:, :1], pool="half")
    with pytest.raises(ValueError, match="norm"):
        skd_pairwise(s, t, norm="l1")
    for loss in (pixel_feature_similarity, skd_pairwise):
        with pytest.raises(ValueError, match="form must be one of"):
            loss(s, t, form="dense")
        with pytest.raises(ValueError, match=r"block_size=8 .*form='gram'.*block_size=None"):
            loss(s, t, form="gram", block_size=8)
    with pytest.raises(ValueError, match="tau"):
        cirkd_minibatch(s, t, tau=0.0)
    with pytest.raises(ValueError, match="group_size .*batch size 2"):
        cirkd_minibatch(s, t, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        cirkd_minibatch(s[:1], t[:1])  # the default pairs of 2 need an even batch
