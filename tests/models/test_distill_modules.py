"""Connectors, the CIRKD projection head and the SKD SAGAN discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models.distill_modules import (CirkdProjectionHead, Connector, SaganDiscriminator,
                                          SelfAttention, SpectralNormConv2d)
from kdjax.models.segmentor import count_params
from tests.models.random_state import random_module, randn

K = 19


@nnx.jit(static_argnames="train")
def run(module, x, train=False):
    return module(x, train)


def _state_arrays(module, kind):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(module, kind))]


# --------------------------------------------------------------------------------------------------
# Connectors and the projection head.

def test_connector_maps_channels_with_a_bias_free_linear_map():
    conn = random_module(lambda: Connector(8, 16, rngs=nnx.Rngs(0)))
    x, y = randn(0, 2, 5, 7, 8), randn(1, 2, 5, 7, 8)
    assert conn.conv.kernel.shape == (1, 1, 8, 16) and conn.conv.bias is None and conn.bn is None
    out = run(conn, x)
    assert out.shape == (2, 5, 7, 16)
    np.testing.assert_allclose(run(conn, x + y), out + run(conn, y), rtol=1e-5, atol=1e-5)


def test_connector_with_bn_relu():
    conn = random_module(lambda: Connector(8, 16, bn_relu=True, rngs=nnx.Rngs(0)))
    x = randn(2, 2, 5, 7, 8)
    out = run(conn, x)
    assert out.shape == (2, 5, 7, 16) and float(out.min()) == 0.0
    before = _state_arrays(conn, nnx.BatchStat)
    run(conn, x, train=True)
    assert not any(np.array_equal(a, b) for a, b in zip(before, _state_arrays(conn, nnx.BatchStat)))


def test_cirkd_projection_head_layout_and_shape():
    head = random_module(lambda: CirkdProjectionHead(16, 32, rngs=nnx.Rngs(0)))
    assert head.hidden.conv.kernel.shape == (1, 1, 16, 32) and head.hidden.conv.bias is None
    assert head.output.kernel.shape == (1, 1, 32, 32) and head.output.bias is None
    assert count_params(head) == 16 * 32 + 2 * 32 + 32 * 32      # two bias-free convs + BN affine
    out = run(head, randn(3, 2, 5, 7, 16))
    assert out.shape == (2, 5, 7, 32)


# --------------------------------------------------------------------------------------------------
# Spectral normalisation.

def _planted_kernel(singular_values, shape, seed):
    """A (kh, kw, in, out) kernel whose (out, kh·kw·in) matrix has the given singular values."""
    out_ch, rest = shape[-1], int(np.prod(shape[:-1]))
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(out_ch, out_ch)))
    right, _ = np.linalg.qr(rng.normal(size=(rest, out_ch)))
    matrix = left @ np.diag(singular_values) @ right.T
    return matrix.T.reshape(shape).astype(np.float32)


def test_power_iteration_normalises_the_top_singular_value_to_one():
    conv = random_module(lambda: SpectralNormConv2d(3, 8, 4, stride=2, padding=1,
                                                    rngs=nnx.Rngs(0)))
    spectrum = [3.0, 1.5, 1.0, 0.8, 0.5, 0.4, 0.2, 0.1]
    kernel = _planted_kernel(spectrum, (4, 4, 3, 8), seed=1)
    conv.conv.kernel[...] = jnp.asarray(kernel)
    x = randn(4, 2, 16, 16, 3)

    u_before = np.asarray(conv.u[...])
    run(conv, x)
    np.testing.assert_array_equal(conv.u[...], u_before)          # eval keeps u
    for _ in range(6):
        run(conv, x, train=True)                                   # one power iteration each
    assert not np.array_equal(conv.u[...], u_before)
    sigma = float(conv.sigma(train=False))
    np.testing.assert_allclose(sigma, 3.0, rtol=1e-3)
    normalised = kernel.reshape(-1, 8).T / sigma
    np.testing.assert_allclose(np.linalg.svd(normalised, compute_uv=False)[0], 1.0, rtol=1e-3)

    # The layer applies the normalised kernel: compare with a plain strided conv.
    expected = jax.lax.conv_general_dilated(
        x, jnp.asarray(kernel / sigma), (2, 2), [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
    np.testing.assert_allclose(run(conv, x), expected, rtol=1e-4, atol=1e-5)


def test_spectral_norm_gradient_treats_u_and_v_as_constants():
    """d/dW of (conv(x, W)/σ(W)) with u, v fixed: finite, and no gradient reaches u."""
    conv = random_module(lambda: SpectralNormConv2d(3, 8, 4, stride=2, padding=1,
                                                    rngs=nnx.Rngs(0)))
    x = randn(5, 2, 8, 8, 3)
    grads = nnx.grad(lambda m: jnp.sum(m(x, train=False) ** 2))(conv)
    assert set(nnx.to_flat_state(grads).to_nested_state().keys()) == {"conv", "bias"}
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------------
# Self-attention.

def test_self_attention_starts_as_identity_and_matches_the_sagan_formula():
    fresh = SelfAttention(16, rngs=nnx.Rngs(0))
    x = randn(6, 2, 3, 5, 16)
    assert float(fresh.gamma[...][0]) == 0.0
    np.testing.assert_array_equal(fresh(x), x)

    attn = random_module(lambda: SelfAttention(16, rngs=nnx.Rngs(0)))
    xs = np.asarray(x, np.float64).reshape(2, 15, 16)

    def project(conv):
        return xs @ np.asarray(conv.kernel[...], np.float64)[0, 0] + np.asarray(conv.bias[...])

    q, k, v = project(attn.query), project(attn.key), project(attn.value)
    energy = np.einsum("nic,njc->nij", q, k)
    weights = np.exp(energy - energy.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)                   # softmax over the keys j
    expected = float(attn.gamma[...][0]) * np.einsum("nij,njc->nic", weights, v) + xs
    np.testing.assert_allclose(attn(x), expected.reshape(x.shape), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# The discriminator.

def test_discriminator_layout_and_parameter_count():
    disc = nnx.eval_shape(lambda: SaganDiscriminator(K, rngs=nnx.Rngs(0)))
    # 4 spectral-norm convs 19→64→128→256→512 (4×4, bias), attention on 256 and 512 channels
    # (q, k to C/8, v to C, all with bias, plus γ), the last 4×4 conv 512→1 with bias, input BN.
    assert count_params(disc) == 3_191_721
    assert [c.conv.kernel.shape for c in (disc.l1, disc.l2, disc.l3, disc.l4)] == [
        (4, 4, K, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512)]
    assert disc.attn1.query.kernel.shape == (1, 1, 256, 32)
    assert disc.attn2.value.kernel.shape == (1, 1, 512, 512)
    assert disc.last.kernel.shape == (4, 4, 512, 1) and disc.last.padding == (0, 0)
    assert disc.preprocess.scale.shape == (K,)


@pytest.fixture(scope="module")
def discriminator():
    return random_module(lambda: SaganDiscriminator(K, conv_dim=8, rngs=nnx.Rngs(0)))


def test_discriminator_score_map_shape(discriminator):
    assert run(discriminator, randn(7, 2, 64, 64, K)).shape == (2, 1, 1, 1)
    # 64×128 logits (a 512×1024 crop at output stride 8): 4×8 after four stride-2 convs.
    assert run(discriminator, randn(8, 2, 64, 128, K)).shape == (2, 1, 5, 1)


def test_discriminator_train_updates_bn_and_u_eval_changes_nothing(discriminator):
    disc = nnx.clone(discriminator)
    x = randn(9, 2, 64, 64, K)
    before = _state_arrays(disc, nnx.BatchStat)
    a, b = run(disc, x), run(disc, x)
    np.testing.assert_array_equal(a, b)
    for old, new in zip(before, _state_arrays(disc, nnx.BatchStat)):
        np.testing.assert_array_equal(old, new)
    run(disc, x, train=True)
    changed = [not np.array_equal(old, new)
               for old, new in zip(before, _state_arrays(disc, nnx.BatchStat))]
    assert all(changed)            # input BN mean and var, and u of l1..l4


def test_discriminator_rejects_small_or_unbatched_input(discriminator):
    with pytest.raises(ValueError, match="at least 64"):
        discriminator(jnp.zeros((2, 48, 64, K)), train=False)
    with pytest.raises(ValueError, match="rank 4"):
        discriminator(jnp.zeros((64, 64, K)), train=False)
