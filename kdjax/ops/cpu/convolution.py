"""The convolution in forms written for XLA's CPU backend: the same maths as XLA's convolution,
with less wasted work.

1. **The kernel gradient is a matrix product.** XLA's CPU backend computes it as a convolution
   whose "kernel" is the output cotangent (a window the size of the feature map over a
   contraction of only N channels), several times slower than the forward pass. With
   ``patches`` (N·H'·W', T·C_in) the input windows of the T kernel taps, ``dK = gᵀ · patches`` contracts over
   N·H'·W' (:func:`tap_backward`). At stride 1 (ungrouped, float32) the same product is formed
   from the input's column windows and the cotangent's row shifts
   (:func:`row_shifted_kernel_gradient`), which write 3 + 3 copies for a 3×3 kernel instead of
   9. The input gradient stays XLA's.
2. **Stride-1 3×3 convolutions of at least ``WINOGRAD_MIN_CHANNELS`` channels run by Winograd's
   F(2×2, 3×3)** (:mod:`kdjax.ops.cpu.winograd`), forward and backward: 2.25× fewer products,
   which pays for the students' 128–512-channel convolutions against the forms below.
3. **1×1 convolutions and those whose products mostly read padding run in the tap form**
   (:func:`runs_in_tap_form`): forward as a sum of per-tap matrix products over the outputs each
   tap reads inside the input (:func:`tap_convolution`); backward, at stride 1, block by block
   over the same products (:func:`block_backward`). A 1×1 convolution is a matrix product, which
   XLA's CPU convolution runs slower than its dot; the ASPP's partly-outside rates spend most of
   XLA's products, forward and backward, on zeros.

:func:`convolve` joins them under one ``custom_vjp``. All tensors are NHWC with HWIO kernels. The
measurements behind each form and threshold: ``benchmarks/NOTES.md`` item 51.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp

from kdjax.ops.cpu.winograd import winograd_convolution, winograd_gradients
from kdjax.ops.xla import Geometry, tap_patches, xla_convolution, xla_input_gradient

Array = jax.Array

# On CPU, convolutions of which at most this share of the products reads the input (not padding)
# run in the tap form, forward and backward: the ASPP's outer rates spend most of XLA's products
# on zeros, and up to this share the tap form is as fast or faster; above it the two are even.
TAP_FORM_FRACTION = 0.9
# Convolutions of fewer floating-point operations than this keep XLA's convolution. The tap form
# compiles an operation per (block, tap) pair of its backward, 49 for a 3×3 with padding 1, and
# for small convolutions that costs more compile time than it saves at run time.
TAP_FORM_MIN_FLOP = 1e8
# Ungrouped convolutions of fewer floating-point operations than this keep XLA's convolution and
# XLA's gradients on the CPU too (kdjax.ops.convolution): their written-out backward saves little
# run time on such small products and doubles the compile time (the demo's student has all its
# convolutions below this).
CPU_FORMS_MIN_FLOP = 1e8
# Winograd's form pays where the products dominate its three memory-bound transforms: from 128
# channels; at 64 channels its input transform costs more than the products it saves.
WINOGRAD_MIN_CHANNELS = 128
# It multiplies the padding too, so convolutions of which much is padding keep the tap form.
WINOGRAD_MIN_VALID_FRACTION = 0.8


def tap_output_ranges(size: int, taps: int, stride: int, pads: tuple[int, int], dilation: int
                      ) -> tuple[int, list[tuple[int, int]]]:
    """Per kernel tap of one spatial axis, the outputs whose input index is inside the input.

    Returns:
      (out, ranges): the output length, and for tap ``t`` the outputs ``[first, stop)`` with
      ``0 <= o·stride − pad_low + t·dilation < size`` (``first == stop``: the tap reads padding only).
    """
    low, high = pads
    out = (size + low + high - dilation * (taps - 1) - 1) // stride + 1
    ranges = []
    for tap in range(taps):
        offset = tap * dilation - low        # input index read by output 0
        first = max(0, -(offset // stride))
        stop = min(out, (size - 1 - offset) // stride + 1)
        ranges.append((first, max(first, stop)))
    return out, ranges


def valid_fraction(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                   geometry: Geometry) -> float:
    """The share of a convolution's (output, tap) products that read the input, not padding."""
    fraction = 1.0
    for axis in (0, 1):
        out, ranges = tap_output_ranges(x_shape[axis + 1], kernel_shape[axis], geometry.stride[axis],
                                        geometry.padding[axis], geometry.dilation[axis])
        fraction *= sum(stop - first for first, stop in ranges) / (out * kernel_shape[axis])
    return fraction


def _taps(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: Geometry):
    """Yields, for every tap that reads the input: (i, j, outputs, window) with ``outputs`` the
    (rows, cols) slices of the output it covers and ``window`` the (start, limit, strides) of the
    input slice it reads for them."""
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    _, row_ranges = tap_output_ranges(x_shape[1], kernel_shape[0], sh, geometry.padding[0], dh)
    _, col_ranges = tap_output_ranges(x_shape[2], kernel_shape[1], sw, geometry.padding[1], dw)
    n, _, _, c = x_shape
    for (i, (r0, r1)), (j, (c0, c1)) in itertools.product(enumerate(row_ranges),
                                                          enumerate(col_ranges)):
        if r0 == r1 or c0 == c1:
            continue
        top = r0 * sh + i * dh - geometry.padding[0][0]
        left = c0 * sw + j * dw - geometry.padding[1][0]
        window = ((0, top, left, 0),
                  (n, top + sh * (r1 - r0 - 1) + 1, left + sw * (c1 - c0 - 1) + 1, c),
                  (1, sh, sw, 1))
        yield i, j, (slice(r0, r1), slice(c0, c1)), window


def _tap_product(a: Array, tap: Array, groups: int) -> Array:
    """(P, C_in) · tap → (P, C_out), block-diagonal over ``groups``, accumulated in float32.
    ``tap``: one kernel tap, (C_in/G, C_out)."""
    if groups == 1:  # the grouped form's reshapes would cost XLA a copy
        return jnp.einsum("pc,co->po", a, tap, preferred_element_type=jnp.float32)
    points = a.shape[0]
    out = jnp.einsum("pgc,cgo->pgo", a.reshape(points, groups, -1),
                     tap.reshape(tap.shape[0], groups, -1), preferred_element_type=jnp.float32)
    return out.reshape(points, -1)


def _add_in_place(total: Array, term: Array, start: tuple[int, ...]) -> Array:
    """``total`` with ``term`` added over the region at ``start`` (an update of that region).

    A sum of zero-padded terms would be one elementwise expression, which XLA fuses into, and
    recomputes in, every consumer; the in-place update is computed once.
    """
    covered = jax.lax.dynamic_slice(total, start, term.shape)
    return jax.lax.dynamic_update_slice(total, covered + term, start)


def tap_convolution(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """The same convolution as a sum over kernel taps of (strided window of x) · K[i, j].

    Each tap multiplies only the outputs where it reads the input, so no product touches the
    padding. Equal to :func:`xla_convolution` up to float rounding; products accumulate in float32.
    """
    n, c_out = x.shape[0], kernel.shape[3]
    oh, _ = tap_output_ranges(x.shape[1], kernel.shape[0], geometry.stride[0],
                              geometry.padding[0], geometry.dilation[0])
    ow, _ = tap_output_ranges(x.shape[2], kernel.shape[1], geometry.stride[1],
                              geometry.padding[1], geometry.dilation[1])
    total = None
    for i, j, (rows, cols), window in _taps(x.shape, kernel.shape, geometry):
        patch = jax.lax.slice(x, *window)
        term = _tap_product(patch.reshape(-1, patch.shape[3]), kernel[i, j], geometry.groups)
        term = term.reshape(*patch.shape[:3], c_out)
        if total is None:  # the first tap sets the output (and its sharding)
            total = jnp.pad(term, ((0, 0), (rows.start, oh - rows.stop),
                                   (cols.start, ow - cols.stop), (0, 0)))
            continue
        total = _add_in_place(total, term, (0, rows.start, cols.start, 0))
    if total is None:  # every tap reads padding only
        total = jnp.zeros((n, oh, ow, c_out), jnp.float32)
    return total.astype(x.dtype)


def runs_in_tap_form(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                     geometry: Geometry) -> bool:
    """Whether the CPU path computes this convolution tap by tap: one of at least
    ``TAP_FORM_MIN_FLOP`` whose kernel is 1×1 (a matrix product, which XLA's CPU convolution runs
    slower than its dot) or of whose products at most ``TAP_FORM_FRACTION`` read the input (XLA's
    convolution computes them all)."""
    return convolution_flop(x_shape, kernel_shape, geometry) >= TAP_FORM_MIN_FLOP and (
        kernel_shape[:2] == (1, 1) or valid_fraction(x_shape, kernel_shape, geometry) <= TAP_FORM_FRACTION)


def convolution_flop(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: Geometry) -> int:
    """The convolution's multiply-adds × 2, padding included."""
    out = [tap_output_ranges(x_shape[axis + 1], kernel_shape[axis], geometry.stride[axis],
                             geometry.padding[axis], geometry.dilation[axis])[0] for axis in (0, 1)]
    return 2 * x_shape[0] * out[0] * out[1] * math.prod(kernel_shape[:3]) * kernel_shape[3]


def pays_off(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: Geometry) -> bool:
    """Whether the CPU forms pay for their compile time on this convolution: every grouped one
    (XLA's CPU runs depthwise convolutions slowly at any size), and the ungrouped ones of at least
    ``CPU_FORMS_MIN_FLOP``."""
    return geometry.groups > 1 or convolution_flop(x_shape, kernel_shape, geometry) >= CPU_FORMS_MIN_FLOP


def runs_in_winograd_form(x: Array, kernel: Array, geometry: Geometry) -> bool:
    """Whether the CPU path computes this convolution by :func:`winograd_form`: a float32,
    ungrouped, stride-1 3×3 convolution (after :func:`touching_taps`) with no crop, at least
    ``WINOGRAD_MIN_CHANNELS`` input and output channels, at least ``TAP_FORM_MIN_FLOP`` and at
    least ``WINOGRAD_MIN_VALID_FRACTION`` of its products inside the input. bfloat16 keeps the
    other forms: its transformed tiles would round to 8 bits before the products."""
    return (kernel.shape[:2] == (3, 3) and geometry.stride == (1, 1) and geometry.groups == 1
            and x.dtype == kernel.dtype == jnp.float32
            and min(pad for pads in geometry.padding for pad in pads) >= 0
            and min(kernel.shape[2:]) >= WINOGRAD_MIN_CHANNELS
            and convolution_flop(x.shape, kernel.shape, geometry) >= TAP_FORM_MIN_FLOP
            and valid_fraction(x.shape, kernel.shape, geometry) >= WINOGRAD_MIN_VALID_FRACTION)


def winograd_form(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """:func:`kdjax.ops.cpu.winograd.winograd_convolution` with this module's geometry."""
    return winograd_convolution(x, kernel, geometry.padding, geometry.dilation)


def cpu_forward(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """Winograd's form where :func:`runs_in_winograd_form`, else the tap form where
    :func:`runs_in_tap_form`, else XLA's convolution."""
    if runs_in_winograd_form(x, kernel, geometry):
        return winograd_form(x, kernel, geometry)
    if runs_in_tap_form(x.shape, kernel.shape, geometry):
        return tap_convolution(x, kernel, geometry)
    return xla_convolution(x, kernel, geometry)


def _kernel_gradient_product(g: Array, windows: Array, groups: int) -> Array:
    """``Σ_p windows[p, t]ᵀ · g[p]`` for every tap t, block-diagonal over ``groups``.

    Args:
      g: (P, C_out) the cotangent; windows: (P, T, C_in) the input windows of the T taps.
    Returns:
      (T, C_in/G, C_out) in float32: each tap's kernel gradient, in the kernel's layout.
    """
    points, taps, c_in = windows.shape
    c_out = g.shape[1]
    # The product's output is ordered (C_out, T, C_in), so that XLA transposes the cotangent for
    # it, not the T times larger windows.
    if groups == 1 and g.dtype == windows.dtype == jnp.float32:
        # Without the unit group axis XLA's CPU dot is faster. This jaxlib's CPU dot has no
        # bfloat16 × bfloat16 → float32 kernel for this form, so other dtypes keep the grouped one.
        product = jnp.einsum("po,ptc->otc", g, windows, preferred_element_type=jnp.float32)
        return product.transpose(1, 2, 0)
    product = jnp.einsum("pgo,ptgc->gotc", g.reshape(points, groups, c_out // groups),
                         windows.reshape(points, taps, groups, c_in // groups),
                         preferred_element_type=jnp.float32)
    return product.transpose(2, 3, 0, 1).reshape(taps, c_in // groups, c_out)


def row_shifted_kernel_gradient(padded: Array, cotangent: Array, taps: tuple[int, int],
                                dilation: tuple[int, int]) -> Array:
    """The kernel gradient of a stride-1, ungrouped float32 convolution as one product, from
    ``kw`` column windows of the input and ``kh`` row shifts of the cotangent.

    With ``X[n, r, w, j] = x_pad[n, r, w + j·d_w]`` for every padded row r (N·H_p·W', kw·C_in) and
    ``G[n, r, w, i] = g[n, r − i·d_h, w]``, zero where that is not an output row (N·H_p·W',
    kh·C_out), ``dK[i, j] = Σ X[:, j]ᵀ · G[:, i]``: a stride-1 convolution has
    ``H_p = H' + d_h·(kh − 1)``, so every shift stays inside its own image. The full window matrix
    of :func:`tap_backward`'s general form writes T = kh·kw copies of the input; this writes kw of
    the input and kh of the cotangent, and multiplies ``H_p / H'`` times as many rows (1.03 for a
    3×3 on 64×64). With a fused producer of the cotangent it is faster than the general form for
    the students' 3×3 convolutions up to dilation 2, and even at dilation 4.

    Args:
      padded: (N, H_p, W_p, C_in) the zero-padded input; cotangent: (N, H', W', C_out) float32;
      taps: (kh, kw); dilation: (d_h, d_w).
    Returns:
      (kh, kw, C_in, C_out) float32.
    """
    n, hp, _, c_in = padded.shape
    _, _, ow, c_out = cotangent.shape
    (kh, kw), (dh, dw) = taps, dilation
    rows = n * hp * ow
    columns = jnp.stack([padded[:, :, j * dw:j * dw + ow] for j in range(kw)], axis=3)
    shifted = jnp.stack([jnp.pad(cotangent, ((0, 0), (i * dh, (kh - 1 - i) * dh), (0, 0), (0, 0)))
                         for i in range(kh)], axis=3)
    # Ordered (kh·C_out, kw·C_in): as fast as the other order or faster.
    product = jnp.einsum("mb,ma->ba", shifted.reshape(rows, kh * c_out),
                         columns.reshape(rows, kw * c_in), preferred_element_type=jnp.float32)
    return product.reshape(kh, c_out, kw, c_in).transpose(0, 2, 3, 1)


def tap_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                 ) -> tuple[Array, Array]:
    """(dx, dK) of the convolution, the kernel gradient as one matrix product over all T taps.

    With ``patches`` the (P, T·C_in) windows of the padded input that the taps read for the
    P = N·H'·W' outputs, ``dK = gᵀ · patches``: a product contracting over P, where XLA's CPU
    backend would run a convolution contracting over only N. The input gradient is XLA's own
    transposed convolution, which is as fast as the forward; forming it from the patches instead
    (``g · K_allᵀ`` added back tap by tap) was slower for 3×3 kernels and compiled T more
    pads and adds per convolution. One product for all taps uses the cotangent once, so XLA
    computes the (BN, ReLU) backward that produces it once; per-tap products each fused and
    recomputed it.
    """
    kh, kw, _, c_out = kernel.shape
    if geometry.stride == (1, 1) and geometry.groups == 1 and x.dtype == cotangent.dtype == jnp.float32:
        pad_h, pad_w = geometry.padding
        padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                             [(0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)])
        d_kernel = row_shifted_kernel_gradient(padded, cotangent, (kh, kw), geometry.dilation)
    else:
        patches = tap_patches(x, kernel.shape, geometry, cotangent.shape[1:3])
        d_kernel = _kernel_gradient_product(cotangent.reshape(-1, c_out), patches, geometry.groups)
    dx = xla_input_gradient(x, kernel, cotangent, geometry)
    return dx, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


def tap_segments(size: int, taps: int, pads: tuple[int, int], dilation: int
                 ) -> list[tuple[int, int, tuple[int, ...]]]:
    """A stride-1 axis's outputs split into runs that the same kernel taps read inside the input.

    Returns:
      ``(first, stop, taps)`` per run: outputs ``[first, stop)`` in order, each read inside the
      input by exactly the taps ``taps``. Outputs that no tap reads there are left out.
    """
    out, ranges = tap_output_ranges(size, taps, 1, pads, dilation)
    bounds = sorted({0, out, *(bound for tap_range in ranges for bound in tap_range)})
    runs = []
    for first, stop in zip(bounds, bounds[1:]):
        live = tuple(tap for tap, (low, high) in enumerate(ranges) if low <= first and stop <= high)
        if live:
            runs.append((first, stop, live))
    return runs


def _block_products(g: Array, windows: Array, tap_kernels: Array, groups: int
                    ) -> tuple[Array, Array]:
    """The two products of one block of :func:`block_backward`, block-diagonal over ``groups``.

    Args:
      g: (N, R, C, C_out) the block's cotangent; windows: (N, R, C, T, C_in) its input windows;
        tap_kernels: (T, C_in/G, C_out) the kernel taps that read them.
    Returns:
      (T, C_in/G, C_out) the taps' kernel gradients and (N, R, C, T, C_in) the windows'
      cotangents, both float32.
    """
    *_, taps, c_in = windows.shape
    points, c_out = g.size // g.shape[-1], g.shape[-1]
    g = g.reshape(points, c_out)
    d_kernel = _kernel_gradient_product(g, windows.reshape(points, taps, c_in), groups)
    if groups == 1:  # the grouped form's unit axis would cost XLA a transposing copy of the product
        d_windows = jnp.einsum("po,tco->ptc", g, tap_kernels, preferred_element_type=jnp.float32)
    else:
        d_windows = jnp.einsum("pgo,tcgo->ptgc", g.reshape(points, groups, c_out // groups),
                               tap_kernels.reshape(taps, -1, groups, c_out // groups),
                               preferred_element_type=jnp.float32)
    return d_kernel, d_windows.reshape(windows.shape)


def block_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                   ) -> tuple[Array, Array]:
    """(dx, dK) of a stride-1 convolution, skipping the products that read padding.

    The outputs are cut into rectangular blocks, each read inside the input by one set S of taps
    (:func:`tap_segments` per axis). For a block's cotangent ``g_b`` (P_b, C_out) and its input
    windows ``w_b`` (P_b, |S|·C_in), ``dK[S] += g_bᵀ · w_b`` and ``g_b · K[S]ᵀ`` is added back
    where each tap read. The blocks partition the cotangent, so each product reads it once and
    XLA computes its producer (the BN and ReLU backward) once in all, as in :func:`tap_backward`.
    For the ASPP's partly-outside rates this is faster than :func:`tap_backward`, which multiplies
    the zeros of the padding in both products.

    Shapes as :func:`conv2d`; ``geometry.stride`` must be (1, 1).
    """
    if geometry.stride != (1, 1):
        raise ValueError(f"block_backward takes stride-1 convolutions, got stride {geometry.stride}")
    n, h, w, c_in = x.shape
    kh, kw, group_in, c_out = kernel.shape
    groups = geometry.groups
    (dh, dw), (pad_h, pad_w) = geometry.dilation, geometry.padding
    d_taps: dict[tuple[int, int], Array] = {}
    dx = jnp.zeros(x.shape, jnp.float32)
    for (r0, r1, row_taps), (c0, c1, col_taps) in itertools.product(
            tap_segments(h, kh, pad_h, dh), tap_segments(w, kw, pad_w, dw)):
        taps = list(itertools.product(row_taps, col_taps))
        block = (n, r1 - r0, c1 - c0)
        starts = [(0, r0 + i * dh - pad_h[0], c0 + j * dw - pad_w[0], 0) for i, j in taps]
        g = cotangent[:, r0:r1, c0:c1]
        windows = jnp.stack([jax.lax.dynamic_slice(x, start, (*block, c_in)) for start in starts], axis=3)
        tap_kernels = jnp.stack([kernel[i, j] for i, j in taps])                 # (T, C_in/G, C_out)
        d_block, d_windows = _block_products(g, windows, tap_kernels, groups)
        for t, tap in enumerate(taps):
            d_taps[tap] = d_taps[tap] + d_block[t] if tap in d_taps else d_block[t]
        for t, start in enumerate(starts):
            dx = _add_in_place(dx, d_windows[:, :, :, t], start)
    zero = jnp.zeros((group_in, c_out), jnp.float32)
    d_kernel = jnp.stack([d_taps.get((i, j), zero) for i in range(kh) for j in range(kw)])
    return dx.astype(x.dtype), d_kernel.reshape(kernel.shape).astype(kernel.dtype)


def xla_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                 ) -> tuple[Array, Array]:
    """(dx, dK) of the convolution as XLA differentiates it."""
    _, vjp = jax.vjp(functools.partial(xla_convolution, geometry=geometry), x, kernel)
    return vjp(cotangent)


def winograd_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                      ) -> tuple[Array, Array]:
    """(dx, dK) of :func:`winograd_form` (:func:`kdjax.ops.cpu.winograd.winograd_gradients`)."""
    return winograd_gradients(x, kernel, cotangent, geometry.padding, geometry.dilation)


def cpu_backward(x: Array, kernel: Array, cotangent: Array, geometry: Geometry
                 ) -> tuple[Array, Array]:
    """:func:`winograd_backward` where the forward :func:`runs_in_winograd_form`,
    :func:`block_backward` for stride-1 convolutions that :func:`runs_in_tap_form`,
    :func:`tap_backward` otherwise."""
    if runs_in_winograd_form(x, kernel, geometry):
        return winograd_backward(x, kernel, cotangent, geometry)
    if geometry.stride == (1, 1) and runs_in_tap_form(x.shape, kernel.shape, geometry):
        return block_backward(x, kernel, cotangent, geometry)
    return tap_backward(x, kernel, cotangent, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def convolve(x: Array, kernel: Array, geometry: Geometry) -> Array:
    """The convolution of ``geometry`` (after :func:`kdjax.ops.xla.touching_taps`) in its CPU
    forms: :func:`cpu_forward`, differentiated by :func:`cpu_backward`.

    Args:
      x: (N, H, W, C_in).
      kernel: (kh, kw, C_in/groups, C_out).
    Returns:
      (N, H', W', C_out) in x's dtype, as :func:`kdjax.ops.xla.xla_convolution`.
    """
    return cpu_forward(x, kernel, geometry)


def _convolve_forward(x, kernel, geometry):
    return cpu_forward(x, kernel, geometry), (x, kernel)


def _convolve_backward(geometry, residuals, cotangent):
    return cpu_backward(*residuals, cotangent, geometry)


convolve.defvjp(_convolve_forward, _convolve_backward)
