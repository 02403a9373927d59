"""XLA's own forms of the convolution and of batch normalisation, differentiated by JAX: what
every platform but the CPU runs (cuDNN, the TPU's convolution units), and what the CPU forms in
:mod:`kdjax.ops.cpu` are tested against.

All tensors are NHWC, kernels HWIO, as ``torch.nn.Conv2d`` with symmetric integer padding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# PyTorch's BatchNorm2d epsilon.
BN_EPS = 1e-5


class Geometry(NamedTuple):
    """Static options of one convolution: per spatial axis (stride, (pad_low, pad_high),
    dilation), and the feature group count. Pads may be negative (a crop)."""

    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int


def touching_taps(size: int, taps: int, stride: int, pad: int, dilation: int
                  ) -> tuple[int, int, tuple[int, int]]:
    """The kernel taps of one spatial axis that read at least one input element.

    Args:
      size: input length; taps: kernel length; stride, pad (both sides), dilation: as in
        ``torch.nn.Conv2d``.
    Returns:
      (first, stop, (pad_low, pad_high)): ``[first, stop)`` is the shortest run of taps holding
      every tap that touches the input (with a stride, a tap inside it may still miss), and the
      padding with which that run alone gives the same output length. All taps, with the given
      padding, when none touches.
    """
    out = (size + 2 * pad - dilation * (taps - 1) - 1) // stride + 1

    def touches(tap: int) -> bool:
        offset = tap * dilation - pad          # input index read by output 0
        first_out = max(0, -(offset // stride))  # first output whose index is >= 0
        return first_out < out and first_out * stride + offset < size

    touching = [tap for tap in range(taps) if touches(tap)]
    if not touching:
        return 0, taps, (pad, pad)
    first, stop = touching[0], touching[-1] + 1
    low = pad - first * dilation
    high = (out - 1) * stride + dilation * (stop - first - 1) + 1 - size - low
    return first, stop, (low, high)


def xla_convolution(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """XLA's convolution: (N, H, W, C_in), (kh, kw, C_in/G, C_out) -> (N, H', W', C_out)."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=geometry.stride, padding=geometry.padding,
        rhs_dilation=geometry.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=geometry.groups)


def xla_input_gradient(x: Array, kernel: Array, cotangent: Array, geometry: Geometry) -> Array:
    """The input gradient of :func:`xla_convolution` (XLA's transposed convolution, as fast as
    the forward): (N, H, W, C_in) for a cotangent (N, H', W', C_out)."""
    _, input_vjp = jax.vjp(lambda inputs: xla_convolution(inputs, kernel, geometry), x)
    (dx,) = input_vjp(cotangent)
    return dx


def tap_patches(x: Array, kernel_shape: tuple[int, ...], geometry: Geometry,
                out_hw: tuple[int, int]) -> Array:
    """The input each kernel tap reads for each output (im2col), zero padding included.

    Args:
      x: (N, H, W, C_in); kernel_shape: (kh, kw, ...); out_hw: the output's (H', W').
    Returns:
      (N·H'·W', T, C_in) with T = kh·kw taps in the kernel's row-major order.
    """
    n, _, _, c_in = x.shape
    kh, kw = kernel_shape[:2]
    (sh, sw), (dh, dw), (pad_h, pad_w) = geometry.stride, geometry.dilation, geometry.padding
    (oh, ow) = out_hw
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)])
    windows = [jax.lax.slice(padded, (0, i * dh, j * dw, 0),
                             (n, i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1, c_in),
                             (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    return jnp.stack(windows, axis=3).reshape(n * oh * ow, kh * kw, c_in)


def grouped(x: Array, groups: int, dtype: Dtype) -> Array:
    """(N, H, W, C) → (G, N/G, H, W, C) in ``dtype``."""
    return x.astype(dtype).reshape(groups, -1, *x.shape[1:])


def group_mean(x: Array) -> Array:
    """Mean over the (N/G, H, W) axes of (G, N/G, H, W, C), kept as (G, 1, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2, 3), keepdims=True)


def normalize(x: Array, scale: Array, bias: Array, groups: int, dtype: Dtype
              ) -> tuple[Array, Array, Array, Array]:
    """Train-mode batch normalisation of each of ``groups`` consecutive slices of the batch with
    its own statistics (Ioffe & Szegedy 2015, Algorithm 1), computed in ``dtype``.

    Args:
      x: (N, H, W, C).
      scale, bias: (C,) in ``dtype``.
    Returns:
      y (N, H, W, C) in ``dtype``; each group's mean and biased variance, (G, C); and 1/σ,
      (G, 1, 1, 1, C).
    """
    xs = grouped(x, groups, dtype)
    mean = group_mean(xs)
    var = group_mean(jnp.square(xs - mean))
    inv_std = jax.lax.rsqrt(var + BN_EPS)
    y = ((xs - mean) * (scale * inv_std) + bias).reshape(x.shape)
    return y, mean.reshape(groups, -1), var.reshape(groups, -1), inv_std
