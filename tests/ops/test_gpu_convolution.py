"""kdjax.ops.gpu.convolution (the dilated convolutions' kernel gradient as one matrix product)
against the float64 NumPy convolution, on value and both gradients; which convolutions take it;
bfloat16, vmap and a batch sharded over devices. Its maths is platform-independent, so it runs
here on the CPU as on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.ops.convolution import conv2d
from kdjax.ops.gpu import convolution
from kdjax.ops.xla import Geometry
from tests.ops.sharded_convolution import sharded_and_one_device
from tests.references.convolution_ref import CASES, case_arrays, reference_forward, reference_gradients

# Cases whose kernel gradient the GPU form computes (dilated, stride 1, ungrouped, several taps),
# and two dilated ones at a DeepLabV3 student's rates on an uneven map.
TAP_GRADIENT = {name: case for name, case in CASES.items()
                if case[4] == (1, 1) and case[7] == 1 and max(case[6]) > 1}
TAP_GRADIENT.update({
    "rate 4, uneven map": ((9, 13), 5, 6, (3, 3), (1, 1), (4, 4), (4, 4), 1),
    "rates 2 and 3, uneven padding": ((10, 7), 4, 3, (3, 3), (1, 1), (2, 3), (2, 3), 1),
    "1x3 at rate 2": ((5, 8), 3, 4, (1, 3), (1, 1), (0, 2), (1, 2), 1),
})


def _arrays(name, seed):
    if name in CASES:
        return case_arrays(name, seed)
    size, c_in, c_out, kernel_size, stride, padding, dilation, groups = TAP_GRADIENT[name]
    rng = np.random.default_rng(seed)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (rng.standard_normal((2, *size, c_in)), rng.standard_normal((*kernel_size, c_in, c_out)),
            options)


def _gpu_conv(options):
    return lambda x, k: conv2d(x, k, kernels="gpu", **options)


def _uses_the_gpu_form(x_shape, kernel_shape, options) -> bool:
    def loss(x, kernel):
        return jnp.sum(_gpu_conv(options)(x, kernel) ** 2)

    return "custom_vjp" in str(jax.make_jaxpr(loss)(jnp.zeros(x_shape), jnp.zeros(kernel_shape)))


def test_the_tap_cases_take_the_gpu_form():
    # The cases' geometry before kdjax.ops.convolution crops the taps past the map: the centre-tap
    # case becomes a 1×1 convolution, which keeps XLA's.
    for name in TAP_GRADIENT:
        x, kernel, options = _arrays(name, 0)
        cropped_to_one_tap = name == "dilation past the map (centre tap only)"
        assert _uses_the_gpu_form(x.shape, kernel.shape, options) != cropped_to_one_tap, name


@pytest.mark.parametrize("name", [n for n in CASES if n not in TAP_GRADIENT])
def test_other_convolutions_keep_xlas_form(name):
    x, kernel, options = _arrays(name, 0)
    assert not _uses_the_gpu_form(x.shape, kernel.shape, options)


@pytest.mark.parametrize("name", list(TAP_GRADIENT))
def test_value_and_gradients_match_the_float64_reference(name):
    x, kernel, options = _arrays(name, 0)
    expected = reference_forward(x, kernel, **options)
    cotangent = np.random.default_rng(1).standard_normal(expected.shape)
    expected_dx, expected_dk = reference_gradients(x, kernel, cotangent, **options)
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(jax.jit(_gpu_conv(options)), *(jnp.asarray(a, jnp.float32)
                                                          for a in (x, kernel)))
        dx, dk = vjp(jnp.asarray(cotangent, jnp.float32))
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(dx, expected_dx, atol=1e-5 * np.abs(expected_dx).max())
    np.testing.assert_allclose(dk, expected_dk, atol=1e-5 * np.abs(expected_dk).max())


def test_the_kernel_gradient_is_a_product_not_a_convolution():
    geometry = Geometry((1, 1), ((4, 4), (4, 4)), (4, 4), 1)
    x, g = jnp.ones((2, 16, 16, 8)), jnp.ones((2, 16, 16, 6))
    text = str(jax.make_jaxpr(convolution.kernel_gradient, static_argnums=(1, 3))(
        x, (3, 3, 8, 6), g, geometry))
    assert "conv_general_dilated" not in text and "dot_general" in text


def test_bfloat16_keeps_the_kernels_dtype_and_accumulates_in_float32():
    x, kernel, options = _arrays("rate 4, uneven map", 2)
    cotangent = np.random.default_rng(3).standard_normal(reference_forward(x, kernel, **options).shape)
    _, expected_dk = reference_gradients(x, kernel, cotangent, **options)
    _, vjp = jax.vjp(_gpu_conv(options), *(jnp.asarray(a, jnp.bfloat16) for a in (x, kernel)))
    dx, dk = vjp(jnp.asarray(cotangent, jnp.bfloat16))
    assert dx.dtype == dk.dtype == jnp.bfloat16
    # bfloat16 inputs (8 bits of mantissa) and one rounding of the float32 sum.
    np.testing.assert_allclose(np.asarray(dk, np.float64), expected_dk,
                               atol=2e-2 * np.abs(expected_dk).max())


def test_vmap_equals_a_loop():
    x, kernel, options = _arrays("dilated 2", 4)
    xs = jnp.asarray(np.stack([x, 2 * x]), jnp.float32)
    kernel = jnp.asarray(kernel, jnp.float32)
    grad = jax.grad(lambda x, k: jnp.sum(_gpu_conv(options)(x, k) ** 2), argnums=1)
    with jax.default_matmul_precision("highest"):
        batched = jax.vmap(grad, in_axes=(0, None))(xs, kernel)
        looped = jnp.stack([grad(x, kernel) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5 * float(jnp.abs(looped).max()))


def test_batch_sharded_over_devices_equals_one_device():
    options = dict(stride=(1, 1), padding=(4, 4), dilation=(4, 4), groups=1)
    with jax.default_matmul_precision("highest"):
        (value, (dx, dk)), (value1, (dx1, dk1)) = sharded_and_one_device(
            _gpu_conv(options), (9, 9, 4), (3, 3, 4, 5))
    np.testing.assert_allclose(value, value1, rtol=1e-5)
    np.testing.assert_allclose(dx, dx1, atol=1e-4)
    np.testing.assert_allclose(dk, dk1, rtol=1e-5, atol=1e-5 * float(jnp.abs(dk1).max()))
