"""kdjax.models.layers against NumPy references of the PyTorch semantics, and against torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models.layers import (BatchNorm2d, Conv2d, ConvBNReLU, adaptive_avg_pool,
                                 max_pool_torch, residual_relu, resize_bilinear_align_corners)
from kdjax.ops.batch_norm import batch_normalize
from tests.losses.contract import numeric_grad


def _randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- NumPy references, written from PyTorch's documented formulas -------------------------------

def _resize_reference(x, h, w):
    """align_corners=True: output (i, j) samples input (i·(H−1)/(h−1), j·(W−1)/(w−1))."""
    n, hi, wi, c = x.shape
    out = np.zeros((n, h, w, c), np.float64)
    for i in range(h):
        sy = i * (hi - 1) / (h - 1) if h > 1 else 0.0
        y0 = int(math.floor(sy)); y1 = min(y0 + 1, hi - 1); fy = sy - y0
        for j in range(w):
            sx = j * (wi - 1) / (w - 1) if w > 1 else 0.0
            x0 = int(math.floor(sx)); x1 = min(x0 + 1, wi - 1); fx = sx - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


def _torch_bin_edges(n, o):
    return [(math.floor(i * n / o), math.ceil((i + 1) * n / o)) for i in range(o)]


def _adaptive_pool_reference(x, oh, ow):
    n, h, w, c = x.shape
    out = np.zeros((n, oh, ow, c), np.float64)
    for i, (y0, y1) in enumerate(_torch_bin_edges(h, oh)):
        for j, (x0, x1) in enumerate(_torch_bin_edges(w, ow)):
            out[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


def _max_pool_reference(x, k, s, p, ceil_mode):
    n, h, w, c = x.shape

    def extent(length):
        out = (length + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        return out - 1 if ceil_mode and (out - 1) * s >= length + p else out

    oh, ow = extent(h), extent(w)
    out = np.full((n, oh, ow, c), -np.inf, np.float64)
    for i in range(oh):
        for j in range(ow):
            y0, x0 = i * s - p, j * s - p
            window = x[:, max(y0, 0):min(y0 + k, h), max(x0, 0):min(x0 + k, w)]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


# --- Conv2d -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 2, 1, 1, 1), (3, 1, 4, 4, 1), (3, 2, 2, 2, 4), (7, 2, 3, 1, 1),
    ((3, 1), (2, 1), (1, 0), 1, 2)])
def test_conv2d_output_size_follows_torch_formula(kernel, stride, padding, dilation, groups):
    conv = nnx.eval_shape(lambda: Conv2d(8, 12, kernel, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(conv)
    y = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 33, 41, 8), jnp.float32))
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    assert y.shape == (2, (33 + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                       (41 + 2 * pw - dw * (kw - 1) - 1) // sw + 1, 12)
    assert conv.kernel.shape == (kh, kw, 8 // groups, 12)


def test_conv2d_1x1_is_a_matmul_plus_bias():
    conv = Conv2d(5, 3, 1, use_bias=True, rngs=nnx.Rngs(1))
    conv.bias[...] = jnp.arange(3.0)
    x = _randn(2, 2, 4, 6, 5)
    expected = x @ np.asarray(conv.kernel[...])[0, 0] + np.arange(3.0)
    np.testing.assert_allclose(conv(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_conv2d_computes_in_dtype_and_keeps_param_dtype():
    conv = Conv2d(4, 4, 3, padding=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert conv.kernel.dtype == jnp.float32
    assert conv(jnp.ones((1, 5, 5, 4))).dtype == jnp.bfloat16


def test_conv2d_rejects_bad_input():
    conv = Conv2d(4, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank 4"):
        conv(jnp.ones((5, 5, 4)))
    with pytest.raises(ValueError, match="4 channels"):
        conv(jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="groups"):
        Conv2d(4, 6, 3, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding"):
        Conv2d(4, 4, 3, padding=-1, rngs=nnx.Rngs(0))


# --- BatchNorm2d --------------------------------------------------------------------------------

def test_batchnorm_train_uses_batch_stats_and_updates_running_stats_like_torch():
    bn = BatchNorm2d(3, rngs=nnx.Rngs(0))
    x = _randn(3, 2, 5, 7, 3) * 2.0 + 1.5
    y = np.asarray(bn(jnp.asarray(x), train=True))
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    # Running stats: momentum 0.1 towards the batch mean and the unbiased variance (n = 70).
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * 70 / 69, rtol=1e-5)


def test_batchnorm_groups_normalise_each_slice_like_per_device_bn():
    x = _randn(4, 4, 3, 5, 3) * 2.0 + 1.5
    grouped = BatchNorm2d(3, rngs=nnx.Rngs(0))
    grouped.batch_groups = 2
    y = np.asarray(grouped(jnp.asarray(x), train=True))
    expected_var = []
    for index in (slice(0, 2), slice(2, 4)):
        separate = BatchNorm2d(3, rngs=nnx.Rngs(0))
        np.testing.assert_allclose(y[index], np.asarray(separate(jnp.asarray(x[index]), train=True)),
                                   rtol=1e-5, atol=1e-5)
        expected_var.append(np.asarray(separate.var[...]))
    # Running statistics move towards the mean of the groups' statistics.
    np.testing.assert_allclose(grouped.var[...], np.mean(expected_var, axis=0), rtol=1e-5)
    np.testing.assert_allclose(grouped.mean[...], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-6)
    # Eval mode ignores the groups; a batch that does not split evenly is refused in train mode.
    running = (x - np.asarray(grouped.mean[...])) / np.sqrt(np.asarray(grouped.var[...]) + 1e-5)
    np.testing.assert_allclose(grouped(jnp.asarray(x), train=False), running, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be split into 2 BN groups"):
        grouped(jnp.asarray(x[:3]), train=True)


def test_batchnorm_eval_uses_running_stats_and_changes_nothing():
    bn = BatchNorm2d(3, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.array([1.0, -2.0, 0.5])
    bn.var[...] = jnp.array([4.0, 0.25, 1.0])
    bn.scale[...] = jnp.array([2.0, 1.0, -1.0])
    bn.bias[...] = jnp.array([0.0, 1.0, 3.0])
    before = jax.tree.map(np.asarray, nnx.state(bn))
    x = _randn(4, 2, 3, 3, 3)
    y = bn(jnp.asarray(x), train=False)
    expected = ((x - [1.0, -2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25, 1.0]) + 1e-5)
                * [2.0, 1.0, -1.0] + [0.0, 1.0, 3.0])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(bn)))


def test_batchnorm_bf16_computes_stats_in_float32():
    bn = BatchNorm2d(2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(_randn(5, 2, 4, 4, 2) + 100.0)
    y = bn(x.astype(jnp.bfloat16), train=True)
    assert y.dtype == jnp.bfloat16 and bn.mean.dtype == jnp.float32
    np.testing.assert_allclose(bn.mean[...], 0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-2)


def _batch_norm_reference(x, scale, bias, groups):
    """float64 (y, per-group mean, biased variance) of train-mode BN over (N/G, H, W) per group."""
    xs = np.asarray(x, np.float64).reshape(groups, -1, *x.shape[1:])
    mean = xs.mean(axis=(1, 2, 3), keepdims=True)
    var = ((xs - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
    y = (xs - mean) / np.sqrt(var + 1e-5) * scale + bias
    return y.reshape(x.shape), mean.reshape(groups, -1), var.reshape(groups, -1)


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_gradients_match_a_float64_reference(groups, kernels):
    """The written-out backward of train-mode BN, against central differences of the float64
    formula: the output's cotangent and the statistics' own (the running statistics read them
    through stop_gradient, but the function is differentiable in them too)."""
    x = _randn(40, 4, 3, 2, 3).astype(np.float64) * 2.0 + 1.5
    scale, bias = _randn(41, 3).astype(np.float64), _randn(42, 3).astype(np.float64)
    w_y = _randn(43, 4, 3, 2, 3).astype(np.float64)
    w_mean, w_var = _randn(44, groups, 3).astype(np.float64), _randn(45, groups, 3).astype(np.float64)

    def objective(x, scale, bias):
        y, mean, var = _batch_norm_reference(x, scale, bias, groups)
        return (y * w_y).sum() + (mean * w_mean).sum() + (var * w_var).sum()

    def kdjax_objective(x, scale, bias):
        y, mean, var = batch_normalize(x, scale, bias, groups=groups, dtype=jnp.float32,
                                       kernels=kernels)
        return (jnp.sum(y * w_y.astype(np.float32)) + jnp.sum(mean * w_mean.astype(np.float32))
                + jnp.sum(var * w_var.astype(np.float32)))

    value, grads = jax.jit(jax.value_and_grad(kdjax_objective, argnums=(0, 1, 2)))(
        *(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)))
    np.testing.assert_allclose(value, objective(x, scale, bias), rtol=1e-5)
    expected = [numeric_grad(lambda x: objective(x, scale, bias), x),
                numeric_grad(lambda s: objective(x, s, bias), scale),
                numeric_grad(lambda b: objective(x, scale, b), bias)]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_batchnorm_gradient_keeps_the_input_dtype_and_is_zero_for_a_shift(kernels):
    """bfloat16 in, bfloat16 gradient out; and a constant added to the input changes nothing, so
    the gradient of any loss is orthogonal to it (it sums to 0 over each channel)."""
    x = jnp.asarray(_randn(46, 4, 3, 5, 2), jnp.bfloat16)
    w = jnp.asarray(_randn(47, 4, 3, 5, 2))
    ones = jnp.ones((2,), jnp.float32)
    loss = lambda x: jnp.sum(batch_normalize(x, ones, 0 * ones, groups=1, dtype=jnp.float32,
                                             kernels=kernels)[0] * w)
    grad = jax.grad(loss)(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(jnp.sum(grad.astype(jnp.float32), axis=(0, 1, 2)), 0.0, atol=0.05)


def test_batchnorm_rejects_a_single_value_per_channel_in_train_mode():
    with pytest.raises(ValueError, match="more than one value"):
        BatchNorm2d(2, rngs=nnx.Rngs(0))(jnp.ones((1, 1, 1, 2)), train=True)


def test_conv_bn_relu_activations():
    x = jnp.asarray(_randn(6, 2, 6, 6, 3) * 10)
    for activation, low, high in [("relu", 0.0, np.inf), ("relu6", 0.0, 6.0),
                                  (None, -np.inf, np.inf)]:
        block = ConvBNReLU(3, 4, 3, padding=1, activation=activation, rngs=nnx.Rngs(0))
        y = np.asarray(block(x, train=True))
        assert y.min() >= low and y.max() <= high
    assert np.asarray(block(x, train=True)).min() < 0  # no activation keeps negatives
    with pytest.raises(ValueError, match="activation"):
        ConvBNReLU(3, 4, 3, activation="gelu", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residual_relu_is_relu_in_value_gradient_and_special_values(dtype):
    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.5, -np.inf, np.inf, np.nan], dtype)
    value, expected = residual_relu(x), jax.nn.relu(x)
    assert value.dtype == dtype
    np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(expected, np.float32))
    # The gradient is 0 at 0, as jax.nn.relu's and PyTorch's threshold_backward.
    def weighted_grad(relu):
        return jax.grad(lambda v: jnp.sum(relu(v) * jnp.arange(1.0, 9.0, dtype=dtype)))(x)

    np.testing.assert_array_equal(np.asarray(weighted_grad(residual_relu), np.float32),
                                  np.asarray(weighted_grad(jax.nn.relu), np.float32))
    np.testing.assert_array_equal(np.asarray(jax.jit(residual_relu)(x), np.float32),
                                  np.asarray(expected, np.float32))


# --- resize, adaptive pool, max pool ------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [((5, 7), (33, 41)), ((38, 42), (297, 329)), ((9, 11), (4, 5)),
                                     ((6, 6), (1, 1)), ((1, 1), (3, 4)), ((5, 7), (5, 9))])
def test_resize_matches_numpy_align_corners(src, dst):
    x = _randn(7, 2, *src, 3)
    y = resize_bilinear_align_corners(jnp.asarray(x), dst)
    np.testing.assert_allclose(y, _resize_reference(x, *dst), rtol=1e-5, atol=1e-5)


def test_resize_keeps_corners_and_identity():
    x = jnp.asarray(_randn(8, 1, 4, 6, 2))
    y = resize_bilinear_align_corners(x, (13, 17))
    rows, cols = [0, 0, -1, -1], [0, -1, 0, -1]
    np.testing.assert_allclose(y[:, rows, cols], x[:, rows, cols], rtol=1e-6)
    assert resize_bilinear_align_corners(x, (4, 6)) is x
    with pytest.raises(ValueError, match="size"):
        resize_bilinear_align_corners(x, (0, 3))


def test_adaptive_pool_bins_are_torch_edges_and_overlap():
    # n = 5, o = 3: bins [0, 2), [1, 4), [3, 5); rows 1 and 3 each belong to two bins.
    assert _torch_bin_edges(5, 3) == [(0, 2), (1, 4), (3, 5)]
    x = np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), (3, 1))[0, :, 0, 0],
                               [0.5, 2.0, 3.5])


@pytest.mark.parametrize("size", [(38, 42), (5, 7), (6, 6), (2, 3)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_pool_matches_numpy(size, bins):
    x = _randn(9, 2, *size, 3)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), bins),
                               _adaptive_pool_reference(x, bins, bins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,s,p,ceil_mode", [(3, 2, 1, False), (3, 2, 1, True), (2, 2, 0, True),
                                             (3, 3, 0, True), (3, 1, 1, False), (5, 2, 2, True)])
@pytest.mark.parametrize("size", [(33, 41), (8, 9), (5, 5)])
def test_max_pool_matches_numpy(k, s, p, ceil_mode, size):
    x = _randn(10, 2, *size, 3) - 5.0  # all negative: zero padding would win the max
    y = max_pool_torch(jnp.asarray(x), k, s, p, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(y, _max_pool_reference(x, k, s, p, ceil_mode))


def test_max_pool_stem_halves_with_ceil_and_rejects_bad_padding():
    y = max_pool_torch(jnp.zeros((1, 149, 165, 1)), 3, 2, 1)
    assert y.shape == (1, 75, 83, 1)
    with pytest.raises(ValueError, match="padding"):
        max_pool_torch(jnp.zeros((1, 8, 8, 1)), 3, 2, 2)
    with pytest.raises(ValueError, match="rank 4"):
        max_pool_torch(jnp.zeros((8, 8, 1)), 3, 2, 1)


# --- against torch ------------------------------------------------------------------------------

def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,use_bias", [
    (3, 1, 1, 1, 1, False), (3, 2, 1, 1, 1, True), (3, 1, 12, 12, 1, False),
    (3, 2, 2, 2, 6, False), (7, 2, 3, 1, 1, False), (1, 2, 0, 1, 1, True)])
def test_conv2d_matches_torch(kernel, stride, padding, dilation, groups, use_bias):
    torch = pytest.importorskip("torch")
    conv = Conv2d(6, 12, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  use_bias=use_bias, rngs=nnx.Rngs(0))
    if use_bias:
        conv.bias[...] = jnp.asarray(_randn(1, 12))
    x = _randn(2, 2, 33, 41, 6)
    weight = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    bias = torch.from_numpy(np.array(conv.bias[...])) if use_bias else None
    expected = torch.nn.functional.conv2d(_nchw(x), weight, bias, stride, padding, dilation, groups)
    np.testing.assert_allclose(conv(jnp.asarray(x)), _nhwc(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_batchnorm_matches_torch_over_train_and_eval_steps():
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(4)
    bn = BatchNorm2d(4, rngs=nnx.Rngs(0))
    weight, bias = _randn(11, 4), _randn(12, 4)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(weight))
        ref.bias.copy_(torch.from_numpy(bias))
    bn.scale[...], bn.bias[...] = jnp.asarray(weight), jnp.asarray(bias)
    for step in range(3):
        x = _randn(20 + step, 2, 3, 5, 4) * (step + 1) + step
        np.testing.assert_allclose(bn(jnp.asarray(x), train=True), _nhwc(ref.train()(_nchw(x))),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.mean[...], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
    x = _randn(30, 2, 3, 5, 4)
    np.testing.assert_allclose(bn(jnp.asarray(x), train=False), _nhwc(ref.eval()(_nchw(x))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_batchnorm_gradients_match_torch(kernels):
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(4).train()
    weight, bias = _randn(13, 4), _randn(14, 4)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(weight))
        ref.bias.copy_(torch.from_numpy(bias))
    x, w = _randn(31, 3, 4, 5, 4) * 3.0 - 1.0, _randn(32, 3, 4, 5, 4)
    x_torch = _nchw(x).requires_grad_(True)
    (ref(x_torch) * _nchw(w)).sum().backward()

    def loss(x, scale, bias):
        return jnp.sum(batch_normalize(x, scale, bias, groups=1, dtype=jnp.float32,
                                       kernels=kernels)[0] * w)

    dx, d_scale, d_bias = jax.grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, (x, weight, bias)))
    np.testing.assert_allclose(dx, _nhwc(x_torch.grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_scale, ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_bias, ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("src,dst", [((5, 7), (33, 41)), ((38, 42), (297, 329)), ((9, 11), (4, 5))])
def test_resize_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    x = _randn(13, 2, *src, 3)
    expected = torch.nn.functional.interpolate(_nchw(x), dst, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(resize_bilinear_align_corners(jnp.asarray(x), dst), _nhwc(expected),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("size", [(38, 42), (5, 7)])
def test_adaptive_pool_matches_torch(size):
    torch = pytest.importorskip("torch")
    x = _randn(14, 2, *size, 3)
    for bins in (1, 2, 3, 6):
        expected = torch.nn.functional.adaptive_avg_pool2d(_nchw(x), bins)
        np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), bins), _nhwc(expected),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("k,s,p,ceil_mode", [(3, 2, 1, False), (3, 2, 1, True), (2, 2, 0, True),
                                             (5, 2, 2, True)])
def test_max_pool_matches_torch(k, s, p, ceil_mode):
    torch = pytest.importorskip("torch")
    x = _randn(15, 2, 33, 41, 3) - 5.0
    expected = torch.nn.functional.max_pool2d(_nchw(x), k, s, p, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(max_pool_torch(jnp.asarray(x), k, s, p, ceil_mode=ceil_mode),
                                  _nhwc(expected))


def test_max_pool_has_a_gradient_routed_to_each_window_maximum():
    x = jnp.asarray(_randn(5, 1, 4, 4, 1))
    grad = np.asarray(jax.grad(lambda v: max_pool_torch(v, 2).sum())(x))[0, :, :, 0]
    xs = np.asarray(x)[0, :, :, 0]
    expected = np.zeros_like(xs)
    for i in (0, 2):
        for j in (0, 2):
            window = xs[i:i + 2, j:j + 2]
            a, b = np.unravel_index(np.argmax(window), window.shape)
            expected[i + a, j + b] = 1.0
    np.testing.assert_array_equal(grad, expected)
