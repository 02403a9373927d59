"""``kdjax.ops.distances``: pairwise L1 distances and their weighted gradient, the same in their CPU
forms (``kdjax.ops.cpu.distances``: loops over blocks of 16 channels or columns) and their plain
ones, against float64 references, across block counts and remainders, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.ops import kernels
from kdjax.ops.distances import l1_distance_gradient, l1_distances

# (K, D, L): one block and less; whole blocks; blocks with a remainder in D and in L.
SHAPES = [(3, 2, 5), (16, 16, 16), (20, 32, 48), (7, 37, 19), (256, 16, 256)]


@pytest.fixture(params=["cpu", "plain"], autouse=True)
def forms(request, monkeypatch):
    """Every test runs with each form of the distances."""
    monkeypatch.setattr(kernels, "cpu_forms", lambda: request.param == "cpu")
    return request.param


def operands(k, d, l, batch=(2,), seed=0):
    """float64 a (*batch, K, D), b (*batch, D, L) and weights (*batch, K, L)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*batch, k, d)), rng.normal(size=(*batch, d, l)),
            rng.normal(size=(*batch, k, l)))


def reference_distances(a, b):
    return np.abs(a[..., :, None, :] - np.swapaxes(b, -1, -2)[..., None, :, :]).sum(-1)


def reference_gradient(w, a, b):
    signs = np.sign(a[..., :, None, :] - np.swapaxes(b, -1, -2)[..., None, :, :])
    return (w[..., None] * signs).sum(-2)


def jitted(op):
    """``jax.jit`` of a fresh wrapper: jit caches a function's trace, which would keep the form of
    the first test that traced it."""
    return jax.jit(lambda *args: op(*args))


def f32(*arrays):
    return tuple(jnp.asarray(x, jnp.float32) for x in arrays)


def test_only_the_cpu_forms_loop(forms):
    a, b, w = f32(*operands(20, 32, 40))
    for op, args in ((l1_distances, (a, b)), (l1_distance_gradient, (w, a, b))):
        assert ("while" in jitted(op).lower(*args).as_text()) == (forms == "cpu")


@pytest.mark.parametrize("k, d, l", SHAPES)
def test_distances_match_float64(k, d, l):
    a, b, _ = operands(k, d, l)
    got = jitted(l1_distances)(*f32(a, b))
    assert got.shape == (2, k, l) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference_distances(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, d, l", SHAPES)
def test_gradient_matches_float64_and_autodiff(k, d, l):
    a, b, w = operands(k, d, l, seed=1)
    w32, a32, b32 = f32(w, a, b)
    got = jitted(l1_distance_gradient)(w32, a32, b32)
    assert got.shape == (2, k, d) and got.dtype == jnp.float32
    atol = 1e-4 * np.abs(w).sum(-1).max()
    np.testing.assert_allclose(got, reference_gradient(w, a, b), rtol=1e-4, atol=atol)
    # It is the gradient of Σ w·d, which autodiff of the plain distances gives too.
    def weighted_sum(x):
        differences = x[..., :, None, :] - jnp.swapaxes(b32, -1, -2)[..., None, :, :]
        return jnp.sum(w32 * jnp.sum(jnp.abs(differences), -1))

    np.testing.assert_allclose(got, jax.grad(weighted_sum)(a32), rtol=1e-4, atol=atol)


def test_sign_is_zero_at_equal_entries():
    # a's channel 0 equals every column's: those terms add nothing, as torch.cdist's gradient.
    a, b, w = operands(4, 18, 17, seed=2)
    b[:, 0, :] = a[:, 0, :1]
    a[:, :, 0] = a[:, :1, 0]
    got = l1_distance_gradient(*f32(w, a, b))
    np.testing.assert_array_equal(got[..., 0], 0.0)
    np.testing.assert_allclose(got, reference_gradient(w, a, b), rtol=1e-4, atol=1e-4)


def test_leading_axes_and_vmap():
    a, b, w = f32(*operands(9, 20, 33, batch=(3, 2), seed=3))
    distances = jitted(jax.vmap(l1_distances))(a, b)
    np.testing.assert_allclose(distances, l1_distances(a, b), rtol=1e-6)
    gradient = jitted(jax.vmap(l1_distance_gradient))(w, a, b)
    np.testing.assert_allclose(gradient, l1_distance_gradient(w, a, b), rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    a, b, w = f32(*operands(4, 3, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., D, L\)"):
        l1_distances(a, jnp.swapaxes(b, -1, -2))
    with pytest.raises(ValueError, match="same leading"):
        l1_distances(a, b[:1])
    with pytest.raises(ValueError, match="weights"):
        l1_distance_gradient(jnp.swapaxes(w, -1, -2), a, b)
