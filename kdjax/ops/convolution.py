"""``conv2d``: ``torch.nn.functional.conv2d`` in NHWC, in the kernels chosen for the platform.

Every platform drops the kernel taps that only read padding. With a dilation as large as the
feature map (the ASPP's rates 12/24/36 on the 32×32 map of a 256×256 crop), some taps fall on the
zero padding for every output position; they contribute exactly zero, so the kernel is cropped to
the taps that touch the input, with padding that keeps the output size (their kernel gradient is
exactly zero, as it is for the full kernel). The cropped convolution then runs as XLA's own
(``kernels='xla'``: plain XLA, differentiable in both modes), in the CPU forms of
:mod:`kdjax.ops.cpu.convolution` (``kernels='cpu'``, where they pay for their compile time:
:func:`kdjax.ops.cpu.convolution.pays_off`) or, for the dilated ones, with the kernel gradient of
:mod:`kdjax.ops.gpu.convolution` (``kernels='gpu'``; both reverse mode only).
"""

from __future__ import annotations

import jax

from kdjax.ops.cpu.convolution import convolve as cpu_convolve
from kdjax.ops.cpu.convolution import pays_off
from kdjax.ops.gpu.convolution import convolve as gpu_convolve
from kdjax.ops.gpu.convolution import takes_tap_gradient
from kdjax.ops.kernels import resolve_kernels
from kdjax.ops.xla import Geometry, touching_taps, xla_convolution

Array = jax.Array


def conv2d(x: Array, kernel: Array, *, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int, kernels: str = "auto") -> Array:
    """``torch.nn.functional.conv2d`` in NHWC.

    Args:
      x: (N, H, W, C_in).
      kernel: (kh, kw, C_in/groups, C_out).
      stride, padding, dilation: per spatial axis; ``padding`` is symmetric.
      groups: feature groups (C_in for a depthwise convolution).
      kernels: 'xla', 'cpu', 'gpu' or 'auto' (:func:`kdjax.ops.kernels.resolve_kernels`).
    Returns:
      (N, H', W', C_out) with ``H' = ⌊(H + 2·pad − dil·(kh − 1) − 1) / stride⌋ + 1``, in x's dtype.
    """
    (rows0, rows1, pad_h), (cols0, cols1, pad_w) = (
        touching_taps(x.shape[axis], kernel.shape[axis - 1], stride[axis - 1],
                      padding[axis - 1], dilation[axis - 1]) for axis in (1, 2))
    geometry = Geometry(tuple(stride), (pad_h, pad_w), tuple(dilation), groups)
    kernel = kernel[rows0:rows1, cols0:cols1]
    platform = resolve_kernels(kernels)
    if platform == "cpu" and pays_off(x.shape, kernel.shape, geometry):
        return cpu_convolve(x, kernel, geometry)
    if platform == "gpu" and takes_tap_gradient(kernel.shape, geometry):
        return gpu_convolve(x, kernel, geometry)
    return xla_convolution(x, kernel, geometry)
