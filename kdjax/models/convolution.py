"""The 2-D convolution behind ``layers.Conv2d``: XLA's convolution forward, with two changes that
keep the maths and remove wasted work.

1. **Taps that only read padding are dropped.** With a dilation as large as the feature map (the
   ASPP's rates 12/24/36 on the 32×32 map of a 256×256 crop), most of a kernel's taps fall on the
   zero padding for every output position. Those taps contribute exactly zero, so the convolution
   runs with the kernel cropped to the taps that touch the input, and padding that keeps the
   output size. Their kernel gradient is exactly zero, as it is for the full kernel.
2. **On CPU the backward pass is one matrix product per kernel tap.** XLA's CPU backend computes
   the kernel gradient as a convolution whose "kernel" is the output cotangent (a window the size
   of the feature map over a contraction of only N channels), which runs 4–14× slower than the
   forward pass (benchmarks/RESULTS.md, 'Convolutions'). Written per tap,
   ``dK[i, j] = Σ_{n,h,w} x_pad[n, h·s + i·d, w·s + j·d, :]ᵀ g[n, h, w, :]`` is a matrix product
   contracting over N·H'·W', and ``dx`` is the sum of the taps' ``g·K[i, j]ᵀ`` placed back at their
   offsets. Other platforms keep XLA's own backward (cuDNN, TPU convolution units).

All tensors are NHWC with HWIO kernels, as ``torch.nn.Conv2d`` with symmetric integer padding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


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
      (first, stop, (pad_low, pad_high)): taps ``[first, stop)`` touch the input (the set is an
      interval), and the padding with which those taps alone give the same output length. All
      taps, with the given padding, when none touches.
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


def conv2d(x: Array, kernel: Array, *, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int) -> Array:
    """``torch.nn.functional.conv2d`` in NHWC.

    Args:
      x: (N, H, W, C_in).
      kernel: (kh, kw, C_in/groups, C_out).
      stride, padding, dilation: per spatial axis; ``padding`` is symmetric.
      groups: feature groups (C_in for a depthwise convolution).
    Returns:
      (N, H', W', C_out) with ``H' = ⌊(H + 2·pad − dil·(kh − 1) − 1) / stride⌋ + 1``, in x's dtype.
    """
    (rows0, rows1, pad_h), (cols0, cols1, pad_w) = (
        touching_taps(x.shape[axis], kernel.shape[axis - 1], stride[axis - 1],
                      padding[axis - 1], dilation[axis - 1]) for axis in (1, 2))
    geometry = Geometry(tuple(stride), (pad_h, pad_w), tuple(dilation), groups)
    kernel = kernel[rows0:rows1, cols0:cols1]
    if kernel.shape[:2] == (1, 1):
        # A 1×1 convolution is a matrix product; XLA's CPU convolution runs it up to 2.6× slower
        # than its dot, and the product's own derivatives are products as well.
        return tap_convolution(x, kernel, geometry)
    return _convolve(x, kernel, geometry)


def xla_convolution(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """XLA's convolution: (N, H, W, C_in), (kh, kw, C_in/G, C_out) -> (N, H', W', C_out)."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=geometry.stride, padding=geometry.padding,
        rhs_dilation=geometry.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=geometry.groups)


def tap_convolution(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """The same convolution as a sum over kernel taps of (strided window of x) · K[i, j].

    Equal to :func:`xla_convolution` (up to float rounding); used for its VJP, whose products
    contract over N·H'·W' (kernel gradient) or C_out (input gradient). Products accumulate in
    float32.
    """
    n, h, w, c = x.shape
    kh, kw, group_in, c_out = kernel.shape
    groups = geometry.groups
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                         [(0, 0, 0), (*geometry.padding[0], 0), (*geometry.padding[1], 0), (0, 0, 0)])
    oh = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    # (G, C_in/G, C_out/G): output channel g·(C_out/G) + k reads input group g.
    per_group = kernel.reshape(kh, kw, group_in, groups, c_out // groups).transpose(0, 1, 3, 2, 4)
    total = None
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(padded, (0, i * dh, j * dw, 0),
                                   (n, i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1, c),
                                   (1, sh, sw, 1))
            if groups == 1:  # the grouped form's reshapes would cost XLA a copy of the window
                term = jnp.einsum("nhwc,co->nhwo", window, kernel[i, j],
                                  preferred_element_type=jnp.float32)
            else:
                term = jnp.einsum("nhwgc,gco->nhwgo", window.reshape(n, oh, ow, groups, group_in),
                                  per_group[i, j], preferred_element_type=jnp.float32)
                term = term.reshape(n, oh, ow, c_out)
            total = term if total is None else total + term
    return total.astype(x.dtype)


def tap_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                 ) -> tuple[Array, Array]:
    """(dx, dK) of the convolution by the per-tap products (see the module docstring)."""
    _, vjp = jax.vjp(functools.partial(tap_convolution, geometry=geometry), x, kernel)
    return vjp(cotangent)


def xla_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                 ) -> tuple[Array, Array]:
    """(dx, dK) of the convolution as XLA differentiates it."""
    _, vjp = jax.vjp(functools.partial(xla_convolution, geometry=geometry), x, kernel)
    return vjp(cotangent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _convolve(x: Array, kernel: Array, geometry: Geometry) -> Array:
    return xla_convolution(x, kernel, geometry)


def _convolve_forward(x, kernel, geometry):
    return xla_convolution(x, kernel, geometry), (x, kernel)


def _convolve_backward(geometry, residuals, cotangent):
    x, kernel = residuals
    return jax.lax.platform_dependent(
        x, kernel, cotangent,
        cpu=functools.partial(tap_backward, geometry=geometry),
        default=functools.partial(xla_backward, geometry=geometry))


_convolve.defvjp(_convolve_forward, _convolve_backward)
