"""Af-DCD's MaskedGenerator: layout, the align conv, the mask before the projector, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.losses.dense_contrast import centre_third_keep_mask, random_keep_mask
from kdjax.models.distill_modules import MaskedGenerator
from kdjax.models.segmentor import count_params
from tests.models.random_state import random_module, randn


@nnx.jit(static_argnames="train")
def run(module, x, keep, train=True):
    return module(x, keep, train)


def _conv(x, conv, padding):
    """A float64 NumPy reference of a stride-1 conv with bias, NHWC / HWIO."""
    kernel = np.asarray(conv.kernel[...], np.float64)
    kh, kw = kernel.shape[:2]
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = sum(np.einsum("nhwc,co->nhwo", x[:, i:i + h, j:j + w], kernel[i, j])
              for i in range(kh) for j in range(kw))
    return out + np.asarray(conv.bias[...], np.float64)


def _relu(x):
    return np.maximum(x, 0)


@pytest.mark.parametrize("enhanced", [False, True])
def test_layout_and_parameter_count(enhanced):
    gen = nnx.eval_shape(lambda: MaskedGenerator(8, 16, enhanced=enhanced, rngs=nnx.Rngs(0)))
    assert gen.align.kernel.shape == (1, 1, 8, 16) and gen.align.bias.shape == (16,)
    convs = ("block1", "block2", "adaptor1", "adaptor2") if enhanced else ("conv1", "conv2")
    for name in convs:
        conv = getattr(gen, name)
        assert conv.kernel.shape == (3, 3, 16, 16) and conv.bias.shape == (16,)
        assert conv.padding == (1, 1)
    unused = ("conv1", "conv2") if enhanced else ("block1", "block2", "adaptor1", "adaptor2")
    assert all(getattr(gen, name) is None for name in unused)
    assert count_params(gen) == 8 * 16 + 16 + len(convs) * (9 * 16 * 16 + 16)


def test_no_align_when_the_channels_match():
    gen = random_module(lambda: MaskedGenerator(16, 16, rngs=nnx.Rngs(0)))
    assert gen.align is None
    assert count_params(gen) == 2 * (9 * 16 * 16 + 16)
    x = randn(0, 2, 5, 6, 16)
    keep = random_keep_mask(jax.random.key(0), (2, 5, 6))
    np.testing.assert_array_equal(gen.masked(x, keep), x * keep[..., None])


@pytest.mark.parametrize("enhanced", [False, True])
def test_forward_matches_the_formula(enhanced):
    gen = random_module(lambda: MaskedGenerator(8, 16, enhanced=enhanced, rngs=nnx.Rngs(0)), seed=1)
    x = randn(1, 2, 5, 6, 8)
    keep = np.asarray(random_keep_mask(jax.random.key(1), (2, 5, 6)))
    masked = _conv(x, gen.align, 0) * keep[..., None]
    if enhanced:
        first = _relu(_conv(masked, gen.block1, 1))
        second = _relu(_conv(first, gen.block2, 1))
        expected = (_conv(first, gen.adaptor1, 1) + _conv(second, gen.adaptor2, 1)) / 2
    else:
        expected = _conv(_relu(_conv(masked, gen.conv1, 1)), gen.conv2, 1)
    out = run(gen, x, jnp.asarray(keep))
    assert out.shape == (2, 5, 6, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_the_mask_applies_before_the_projector():
    gen = random_module(lambda: MaskedGenerator(8, 16, rngs=nnx.Rngs(0)), seed=2)
    x = randn(2, 2, 6, 6, 8)
    keep = centre_third_keep_mask((2, 6, 6))
    # Dropped positions are 0 after the mask, whatever the input and the align conv's bias there.
    masked = np.asarray(gen.masked(x, keep))
    assert np.all(masked[:, 2:4, 2:4] == 0) and np.any(masked[:, 0, 0] != 0)
    changed = x.at[:, 2:4, 2:4].set(randn(3, 2, 2, 2, 8) * 100)
    np.testing.assert_array_equal(run(gen, changed, keep), run(gen, x, keep))
    # The projector still fills the dropped positions in from their neighbours.
    assert np.any(np.asarray(run(gen, x, keep))[:, 2:4, 2:4] != 0)
    # Without a mask (or an all-True one) nothing is dropped.
    everything = jnp.ones((2, 6, 6), bool)
    np.testing.assert_array_equal(run(gen, x, None), run(gen, x, everything))
    assert not np.array_equal(run(gen, changed, None), run(gen, x, None))


def test_bfloat16_compute():
    def make(dtype):
        return MaskedGenerator(8, 16, enhanced=True, dtype=dtype, rngs=nnx.Rngs(0))

    full = random_module(lambda: make(jnp.float32), seed=3)
    half = random_module(lambda: make(jnp.bfloat16), seed=3)
    assert half.block1.kernel[...].dtype == jnp.float32            # param_dtype stays float32
    x = randn(4, 2, 5, 6, 8)
    keep = random_keep_mask(jax.random.key(2), (2, 5, 6))
    out = run(half, x, keep)
    assert out.dtype == jnp.bfloat16
    expected = np.asarray(run(full, x, keep))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0.05,
                               atol=0.05 * np.abs(expected).max())


def test_gradients_reach_every_parameter_and_the_input():
    gen = random_module(lambda: MaskedGenerator(8, 16, enhanced=True, rngs=nnx.Rngs(0)), seed=4)
    x = randn(5, 2, 5, 6, 8)
    keep = random_keep_mask(jax.random.key(3), (2, 5, 6))
    grads, x_grad = nnx.grad(lambda m, x: jnp.sum(m(x, keep, train=True) ** 2), argnums=(0, 1))(
        gen, x)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
    # The input's gradient vanishes at dropped positions.
    dropped = ~np.asarray(keep)
    assert np.all(np.asarray(x_grad)[dropped] == 0) and np.any(np.asarray(x_grad)[~dropped] != 0)


def test_bad_inputs():
    gen = random_module(lambda: MaskedGenerator(8, 16, rngs=nnx.Rngs(0)))
    x = randn(6, 2, 5, 6, 8)
    with pytest.raises(ValueError, match="keep_mask must have shape"):
        gen(x, jnp.ones((2, 6, 5), bool), train=True)
    with pytest.raises(ValueError, match="rank 4"):
        gen(x[0], None, train=True)
    with pytest.raises(ValueError, match="8 channels"):
        gen(x[..., :4], None, train=True)
