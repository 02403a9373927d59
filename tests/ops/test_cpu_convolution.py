"""kdjax.ops.cpu.convolution against a float64 NumPy convolution written from torch.nn.Conv2d's
definition, on value and on both gradients, for both backward implementations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.ops.convolution import conv2d
from kdjax.ops.cpu import convolution, winograd
from kdjax.ops.xla import Geometry, touching_taps, xla_convolution
from tests.devices import skip_unless_cpu
from tests.ops.sharded_convolution import sharded_and_one_device
from tests.references.convolution_ref import (CASES, reference_forward, reference_gradients)
from tests.references.convolution_ref import case_arrays as _case

@pytest.fixture(params=["as configured", "tap form everywhere", "winograd everywhere"])
def cpu_form(request, monkeypatch):
    """Runs a test with the CPU's forms as configured (XLA's convolution for these small cases);
    with the tap form taken wherever TAP_FORM_FRACTION allows, whatever the size; and with
    Winograd's form taken for every float32 stride-1 3×3 convolution, the rest as before."""
    if request.param != "as configured":
        monkeypatch.setattr(convolution, "TAP_FORM_MIN_FLOP", 0)
    if request.param == "winograd everywhere":
        monkeypatch.setattr(convolution, "WINOGRAD_MIN_CHANNELS", 0)
        monkeypatch.setattr(convolution, "WINOGRAD_MIN_VALID_FRACTION", 0.0)
    return request.param


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("name", CASES)
def test_value_and_gradients_match_the_float64_reference(name, cpu_form):
    x, kernel, options = _case(name)
    expected = reference_forward(x, kernel, **options)
    cotangent = np.random.default_rng(1).standard_normal(expected.shape)
    expected_dx, expected_dk = reference_gradients(x, kernel, cotangent, **options)

    out, vjp = jax.vjp(jax.jit(lambda x, k: conv2d(x, k, **options)), *_f32(x, kernel))
    dx, dk = vjp(jnp.asarray(cotangent, jnp.float32))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=1e-5 * scale)
    np.testing.assert_allclose(dx, expected_dx, atol=1e-5 * np.abs(expected_dx).max())
    np.testing.assert_allclose(dk, expected_dk, atol=1e-5 * np.abs(expected_dk).max())


def _geometry(x, kernel, options):
    pads = tuple((p, p) for p in options["padding"])
    return Geometry(options["stride"], pads, options["dilation"], options["groups"])


STRIDE_1 = [name for name, case in CASES.items() if case[4] == (1, 1)]
WINOGRAD = [name for name, case in CASES.items()
            if case[3] == (3, 3) and case[4] == (1, 1) and case[7] == 1]
BACKWARDS = [(backward, name) for backward, names in
             [(convolution.tap_backward, CASES), (convolution.xla_backward, CASES),
              (convolution.block_backward, STRIDE_1), (convolution.winograd_backward, WINOGRAD)]
             for name in names]


@pytest.mark.parametrize("backward, name", BACKWARDS,
                         ids=[f"{backward.__name__}-{name}" for backward, name in BACKWARDS])
def test_every_backward_implementation_matches_the_reference(name, backward):
    x, kernel, options = _case(name, seed=2)
    cotangent = np.random.default_rng(3).standard_normal(reference_forward(x, kernel, **options).shape)
    expected_dx, expected_dk = reference_gradients(x, kernel, cotangent, **options)
    dx, dk = jax.jit(backward, static_argnums=3)(*_f32(x, kernel, cotangent),
                                                 _geometry(x, kernel, options))
    np.testing.assert_allclose(dx, expected_dx, atol=1e-5 * np.abs(expected_dx).max())
    np.testing.assert_allclose(dk, expected_dk, atol=1e-5 * np.abs(expected_dk).max())


@pytest.mark.parametrize("name", CASES)
def test_tap_form_equals_xla_convolution(name):
    x, kernel, options = _case(name, seed=4)
    geometry = _geometry(x, kernel, options)
    x, kernel = _f32(x, kernel)
    tap, xla = (jax.jit(form, static_argnums=2)(x, kernel, geometry)
                for form in (convolution.tap_convolution, xla_convolution))
    np.testing.assert_allclose(tap, xla, atol=2e-5)


@pytest.mark.parametrize("dilation", [1, 2])
def test_stride_1_kernel_gradient_writes_no_full_window_matrix(dilation):
    # The window matrix of all nine taps alone is 9× the input; the row-shifted form writes three
    # column windows of the input and three row shifts of the cotangent (7.5–8× here, 17× before).
    skip_unless_cpu("the CPU forms' buffers")
    x, cotangent = jnp.ones((2, 32, 32, 64)), jnp.ones((2, 32, 32, 64))
    geometry = Geometry((1, 1), ((dilation, dilation),) * 2, (dilation, dilation), 1)
    compiled = jax.jit(convolution.tap_backward, static_argnums=3).lower(
        x, jnp.ones((3, 3, 64, 64)), cotangent, geometry).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 9 * x.nbytes


def _brute_force_touching(size, taps, stride, pad, dilation):
    out = (size + 2 * pad - dilation * (taps - 1) - 1) // stride + 1
    return [t for t in range(taps)
            if any(0 <= o * stride - pad + t * dilation < size for o in range(out))]


def test_touching_taps_spans_exactly_the_touching_taps_and_keeps_the_output_length():
    for size, taps, stride, pad, dilation in itertools.product(
            range(1, 10), (1, 2, 3, 5), (1, 2, 3), range(0, 14, 3), (1, 2, 4, 7, 12)):
        out = (size + 2 * pad - dilation * (taps - 1) - 1) // stride + 1
        if out < 1:
            continue
        first, stop, (low, high) = touching_taps(size, taps, stride, pad, dilation)
        touching = _brute_force_touching(size, taps, stride, pad, dilation)
        if not touching:
            assert (first, stop, (low, high)) == (0, taps, (pad, pad))
            continue
        assert (first, stop - 1) == (touching[0], touching[-1])
        kept = stop - first
        assert (size + low + high - dilation * (kept - 1) - 1) // stride + 1 == out
        # Output 0's first kept tap reads the same input index as before.
        assert -low == first * dilation - pad


def test_aspp_rate_past_the_map_runs_as_a_matrix_product():
    """Rate 36 on a 32×32 map: only the centre tap reads the input, so no convolution remains.
    The ASPP's shapes (batch 8, 512 channels), lowered only."""
    x = jax.ShapeDtypeStruct((8, 32, 32, 512), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
    text = jax.jit(lambda x, k: conv2d(x, k, stride=(1, 1), padding=(36, 36), dilation=(36, 36),
                                       groups=1, kernels="cpu")).lower(x, kernel).as_text()
    assert "convolution" not in text and "dot_general" in text


def test_pruned_taps_get_exactly_zero_gradient():
    x, kernel, options = _case("dilation past the map (centre tap only)")
    dk = jax.grad(lambda k: jnp.sum(conv2d(jnp.asarray(x, jnp.float32), k, **options) ** 2))(
        jnp.asarray(kernel, jnp.float32))
    mask = np.ones((3, 3), bool)
    mask[1, 1] = False
    assert np.all(np.asarray(dk)[mask] == 0.0)
    assert np.all(np.asarray(dk)[1, 1] != 0.0)


@pytest.mark.parametrize("name", ["3x3 stride 2", "depthwise", "dilation partly past the map",
                                  "groups 3, multiplier 2"])
def test_bfloat16_stays_bfloat16_and_close_to_float32(name, cpu_form):
    x, kernel, options = _case(name, seed=5)
    x32, k32 = _f32(x, kernel)

    def loss(x, k):
        return jnp.sum(conv2d(x, k, **options).astype(jnp.float32) ** 2)

    forward = jax.jit(lambda x, k: conv2d(x, k, **options))
    out = forward(x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), forward(x32, k32),
                               rtol=3e-2, atol=3e-2 * float(jnp.abs(out).max()))
    gradients = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grads16 = gradients(x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16))
    grads32 = gradients(x32, k32)
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32,
                                   atol=5e-2 * float(jnp.abs(g32).max()))


@pytest.mark.parametrize("name", ["strided and dilated", "dilation partly past the map"])
def test_vmap_equals_a_loop(name, cpu_form):
    x, kernel, options = _case(name, seed=6)
    x, kernel = _f32(x, kernel)
    stacked = jnp.stack([x, 2.0 * x, -x])

    def loss(x, k):
        return jnp.sum(jnp.sin(conv2d(x, k, **options)))

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(0, None)))
    values, (dxs, dks) = batched(stacked, kernel)
    for index, xi in enumerate(stacked):
        value, (dx, dk) = jax.value_and_grad(loss, argnums=(0, 1))(xi, kernel)
        np.testing.assert_allclose(values[index], value, rtol=1e-5)
        # Batched, the products may sum in another order: 6e-6 relative on an AVX-512 host.
        np.testing.assert_allclose(dxs[index], dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dks[index], dk, rtol=1e-5, atol=1e-4)


def test_batch_sharded_over_devices_equals_one_device(cpu_form):
    options = dict(stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=1)
    (value, (dx, dk)), (value1, (dx1, dk1)) = sharded_and_one_device(
        lambda x, k: conv2d(x, k, **options), (6, 6, 4), (3, 3, 4, 5))
    np.testing.assert_allclose(value, value1, rtol=1e-5)
    np.testing.assert_allclose(dx, dx1, atol=1e-4)
    np.testing.assert_allclose(dk, dk1, atol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_tap_output_ranges_read_only_the_input(name):
    x, kernel, options = _case(name)
    geometry = _geometry(x, kernel, options)
    for axis in (0, 1):
        size, taps = x.shape[axis + 1], kernel.shape[axis]
        stride, pads, dilation = geometry.stride[axis], geometry.padding[axis], geometry.dilation[axis]
        out, ranges = convolution.tap_output_ranges(size, taps, stride, pads, dilation)
        for tap, (first, stop) in enumerate(ranges):
            reads = [o for o in range(out) if 0 <= o * stride - pads[0] + tap * dilation < size]
            assert list(range(first, stop)) == reads


def _cpu_programs(name):
    """The lowered (StableHLO) text of cpu_forward and cpu_backward for one case."""
    x, kernel, options = _case(name)
    geometry = _geometry(x, kernel, options)
    x, kernel = _f32(x, kernel)
    out = xla_convolution(x, kernel, geometry)
    forward = jax.jit(lambda x, k: convolution.cpu_forward(x, k, geometry)).lower(x, kernel)
    backward = jax.jit(lambda x, k, g: convolution.cpu_backward(x, k, g, geometry)).lower(x, kernel, out)
    return forward.as_text(), backward.as_text()


@pytest.mark.parametrize("name", ["dilation partly past the map", "1x3 asymmetric"])
def test_mostly_padding_convolution_runs_in_tap_form_on_cpu(name, monkeypatch):
    """Rate 5 on an 8×8 map (under half of the products read the input), and a 1×3 kernel with
    its padding on a 6-wide map (0.89): no convolution op forward or backward, once the size
    threshold admits these small cases."""
    monkeypatch.setattr(convolution, "TAP_FORM_MIN_FLOP", 0)
    x, kernel, options = _case(name)
    geometry = _geometry(x, kernel, options)
    assert convolution.runs_in_tap_form(x.shape, kernel.shape, geometry)
    for text in _cpu_programs(name):
        assert "convolution" not in text


@pytest.mark.parametrize("name, min_flop", [("3x3 on 16x16", 0), ("dilation partly past the map", None)],
                         ids=["most products inside", "below the size threshold"])
def test_other_convolutions_run_as_xla_convolution_on_cpu(name, min_flop, monkeypatch):
    """A 3×3 with padding 1 on 16×16 (0.92 of the products read the input, above
    TAP_FORM_FRACTION), and any convolution below TAP_FORM_MIN_FLOP: XLA's convolution forward
    and for the input gradient."""
    if min_flop is not None:
        monkeypatch.setattr(convolution, "TAP_FORM_MIN_FLOP", min_flop)
    x, kernel, options = _case(name)
    assert not convolution.runs_in_tap_form(x.shape, kernel.shape, _geometry(x, kernel, options))
    for text in _cpu_programs(name):
        assert "convolution" in text


def test_winograd_form_with_uneven_padding_and_dilation_matches_the_reference():
    """Different pads on each side and a different dilation per axis, on sizes that the 2·d-output
    tiles do not divide: the reference runs on the input padded the same way, unpadded. The
    written-out gradients, directly."""
    rng = np.random.default_rng(8)
    x, kernel = rng.standard_normal((2, 9, 7, 3)), rng.standard_normal((3, 3, 3, 4))
    padding, dilation = ((2, 0), (1, 3)), (1, 2)
    padded = np.pad(x, ((0, 0), *padding, (0, 0)))
    options = dict(stride=(1, 1), padding=(0, 0), dilation=dilation, groups=1)
    expected = reference_forward(padded, kernel, **options)
    cotangent = rng.standard_normal(expected.shape)
    expected_dx, expected_dk = reference_gradients(padded, kernel, cotangent, **options)
    expected_dx = expected_dx[:, 2:11, 1:8]

    x, kernel, cotangent = _f32(x, kernel, cotangent)
    out = jax.jit(winograd.winograd_convolution, static_argnums=(2, 3))(x, kernel, padding, dilation)
    dx, dk = jax.jit(winograd.winograd_gradients, static_argnums=(3, 4))(
        x, kernel, cotangent, padding, dilation)
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(dx, expected_dx, atol=1e-5 * np.abs(expected_dx).max())
    np.testing.assert_allclose(dk, expected_dk, atol=1e-5 * np.abs(expected_dk).max())


def _winograd_chain_scratch(layers: int, channels: int = 8, size: int = 32) -> int:
    """Compiled scratch bytes of an SGD step through ``layers`` 3×3 convolutions + ReLU."""
    def loss(kernels, x):
        for kernel in kernels:
            x = jax.nn.relu(conv2d(x, kernel, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                                   groups=1))
        return jnp.sum(x * x)

    def step(kernels, x):
        return [k - 0.1 * g for k, g in zip(kernels, jax.grad(loss)(kernels, x))]

    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    kernels = [jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.float32)] * layers
    compiled = jax.jit(step, donate_argnums=0).lower(kernels, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_winograd_backward_keeps_no_tiles_of_the_forward_pass(monkeypatch):
    """Each layer of a deeper network should add its activations to the step's scratch (the ReLU
    output, one input's worth), not also its 4×-larger tiles: the backward pass forms them again.
    XLA would otherwise take the backward's tiles for the forward pass's identical ones (324 KB a
    layer here instead of 68 KB)."""
    skip_unless_cpu("the CPU forms' buffers")
    monkeypatch.setattr(convolution, "TAP_FORM_MIN_FLOP", 0)
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_CHANNELS", 0)
    input_bytes = 2 * 32 * 32 * 8 * 4
    per_layer = (_winograd_chain_scratch(8) - _winograd_chain_scratch(2)) / 6
    assert per_layer < 2 * input_bytes


def _student_convolution(c_in, c_out, size, dilation, dtype=jnp.float32, stride=1):
    x = jax.ShapeDtypeStruct((8, size, size, c_in), dtype)
    kernel = jax.ShapeDtypeStruct((3, 3, c_in, c_out), dtype)
    return x, kernel, Geometry((stride, stride), ((dilation, dilation),) * 2, (dilation, dilation), 1)


@pytest.mark.parametrize("c_in, c_out, size, dilation", [(512, 512, 32, 4), (256, 256, 32, 2),
                                                        (128, 128, 32, 1), (256, 512, 32, 2)])
def test_wide_student_convolutions_run_in_winograd_form_on_cpu(c_in, c_out, size, dilation):
    """DeepLabV3-R18's 3×3 convolutions of 128 channels and more (output stride 8, 256×256 crops):
    no convolution op forward or backward, 16 products forward. Lowered only."""
    x, kernel, geometry = _student_convolution(c_in, c_out, size, dilation)
    assert convolution.runs_in_winograd_form(x, kernel, geometry)
    forward = jax.jit(lambda x, k: convolution.cpu_forward(x, k, geometry)).lower(x, kernel).as_text()
    cotangent = jax.ShapeDtypeStruct((8, size, size, c_out), jnp.float32)
    backward = jax.jit(lambda x, k, g: convolution.cpu_backward(x, k, g, geometry)).lower(
        x, kernel, cotangent).as_text()
    assert "convolution" not in forward and "convolution" not in backward
    assert "16x8x" in forward and "dot_general" in forward


@pytest.mark.parametrize("case", [
    (64, 64, 64, 1, jnp.float32, 1), (512, 512, 32, 12, jnp.float32, 1),
    (512, 512, 32, 4, jnp.bfloat16, 1), (128, 128, 64, 1, jnp.float32, 2)],
    ids=["64 channels", "mostly padding (ASPP rate 12)", "bfloat16", "stride 2"])
def test_other_convolutions_keep_their_forms(case):
    assert not convolution.runs_in_winograd_form(*_student_convolution(*case))
