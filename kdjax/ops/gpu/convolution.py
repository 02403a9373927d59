"""The dilated convolutions' kernel gradient as one matrix product, for GPUs.

XLA writes the kernel gradient of a convolution as another convolution, whose window is the whole
feature map and whose stride is the forward's dilation. For the dilated 3×3 convolutions of a
DeepLabV3 student (layer 3 at dilation 2, layer 4 at 4, the ASPP at 12/24/36), cuDNN runs those in
Ampere-generation implicit-GEMM kernels at 12–25 % occupancy on an H200: 31 % of the bfloat16
distillation step (``benchmarks/NOTES.md`` item 50). The same gradient is
``dK = patchesᵀ · g``, a product contracting over the N·H'·W' outputs (:func:`kernel_gradient`),
which cuBLAS runs on the matrix units, at the price of T copies of the input (T kernel taps). On
an H200 the student's bfloat16 step runs 1.5× faster so, and the distillation step 1.3×; the
copies take about 5 of its 109 ms of kernels (``benchmarks/NOTES.md`` item 59). The forms are
plain XLA operations, so they run on any backend.

:func:`convolve` keeps XLA's forward and input gradient and replaces only the kernel gradient, for
the convolutions :func:`takes_tap_gradient` selects. All tensors are NHWC with HWIO kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kdjax.ops.xla import Geometry, tap_patches, xla_convolution, xla_input_gradient

Array = jax.Array


def takes_tap_gradient(kernel_shape: tuple[int, ...], geometry: Geometry) -> bool:
    """Whether a convolution's kernel gradient is formed as one product on GPUs: dilated,
    stride 1, ungrouped, with more than one tap (the convolutions whose kernel gradient cuDNN
    runs in its slow kernels; undilated ones get Hopper's own)."""
    return (geometry.stride == (1, 1) and geometry.groups == 1 and max(geometry.dilation) > 1
            and math.prod(kernel_shape[:2]) > 1)


def kernel_gradient(x: Array, kernel_shape: tuple[int, ...], cotangent: Array,
                    geometry: Geometry) -> Array:
    """The kernel gradient of an ungrouped convolution, ``dK[t] = Σ_p patches[p, t]ᵀ · g[p]``.

    Args:
      x: (N, H, W, C_in); kernel_shape: (kh, kw, C_in, C_out); cotangent: (N, H', W', C_out).
    Returns:
      (kh, kw, C_in, C_out), accumulated in float32.
    """
    patches = tap_patches(x, kernel_shape, geometry, cotangent.shape[1:3])
    g = cotangent.reshape(-1, kernel_shape[3])
    product = jnp.einsum("ptc,po->tco", patches, g, preferred_element_type=jnp.float32)
    return product.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def convolve(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """XLA's convolution, with the kernel gradient of :func:`kernel_gradient`.

    Args:
      x: (N, H, W, C_in).
      kernel: (kh, kw, C_in, C_out).
      geometry: stride 1, ungrouped (:func:`takes_tap_gradient`).
    Returns:
      (N, H', W', C_out) in x's dtype, as :func:`kdjax.ops.xla.xla_convolution`.
    """
    return xla_convolution(x, kernel, geometry)


def _convolve_forward(x, kernel, geometry):
    return xla_convolution(x, kernel, geometry), (x, kernel)


def _convolve_backward(geometry, residuals, cotangent):
    x, kernel = residuals
    return (xla_input_gradient(x, kernel, cotangent, geometry),
            kernel_gradient(x, kernel.shape, cotangent, geometry).astype(kernel.dtype))


convolve.defvjp(_convolve_forward, _convolve_backward)
