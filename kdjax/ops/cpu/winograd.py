"""Stride-1 3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3), for the CPU path of
:mod:`kdjax.ops.cpu.convolution`.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016), the nested 2-D
F(2×2, 3×3): each 2×2 block of outputs is ``Y = Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A``, with d_c the
4×4 input tile and g_c the 3×3 kernel of input channel c. Over all tiles and channels this is 16
matrix products (tiles × C_in)·(C_in × C_out), one per element of the 4×4 transformed tile: 16
multiplications per 2×2 outputs where the direct convolution takes 36, so 2.25× fewer products,
bought with three elementwise transforms that XLA fuses. The input and output transforms use only
±1, the kernel transform ±½, so the float32 error stays near the direct sum's (about 1e-6 relative
for 512 channels). With dilation d, output rows ``o ≡ r (mod d)`` read only input rows of the same
residue, so every tile spans ``2·d`` outputs and its taps step by d.

The gradients are Winograd-shaped too (:func:`winograd_gradients`): with ``dM`` the cotangent taken
back through the output transform, ``dx`` is the input transform's transpose applied to ``dM·Uᵀ``
and ``dU = Vᵀ·dM``, 16 products each. They are written out rather than left to autodiff, whose
transpose of the tile slicing pads every tap to the full tile tensor and adds the copies: 1.5 GB
more scratch in DeepLabV3-R18's train step. Two data dependencies (:mod:`kdjax.ops.cpu.ordering`)
keep the backward's scratch to one layer's at a time: the input's tiles are formed again from x
tied to the cotangent, and dx is tied to dK. Without them the R18 step needs 2.4 GB instead of
1.6 GB. Shapes as :func:`kdjax.ops.cpu.convolution.conv2d`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.ops.cpu.ordering import after

Array = jax.Array

# Lavin & Gray's F(2, 3) matrices: the input transform Bᵀ (4×4), the kernel transform G (4×3)
# and the output transform Aᵀ (2×4).
INPUT_TRANSFORM = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
KERNEL_TRANSFORM = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
OUTPUT_TRANSFORM = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
TILE = 4        # input tile per axis
OUTPUTS = 2     # outputs per tile and axis


def _combine(parts: Sequence[Array], matrix: np.ndarray) -> list[Array]:
    """``[Σ_t matrix[k, t] · parts[t] for each row k]`` for a matrix of 0 and ±1 (the input and
    output transforms), as adds and subtractions, which XLA fuses into one elementwise pass (a dot
    with a 4×4 matrix would run as a product of its own)."""
    rows = []
    for coefficients in matrix:
        total = None
        for coefficient, part in zip(coefficients, parts):
            if coefficient == 0:
                continue
            term = part if coefficient == 1 else -part
            total = term if total is None else total + term
        rows.append(total)
    return rows


def _tile_taps(x: Array, axis: int, dilation: int, tiles: int) -> list[Array]:
    """The four taps of every tile along ``axis``.

    Args:
      x: padded so that ``axis`` has ``(2·tiles + 2)·dilation`` elements.
    Returns:
      4 arrays, ``axis`` replaced by (tiles, dilation): tap t of tile a at residue r is
      ``x[(2a + t)·dilation + r]``.
    """
    shape = x.shape
    x = x.reshape(*shape[:axis], OUTPUTS * tiles + TILE - OUTPUTS, dilation, *shape[axis + 1:])
    return [jax.lax.slice_in_dim(x, tap, tap + OUTPUTS * (tiles - 1) + 1, stride=OUTPUTS, axis=axis)
            for tap in range(TILE)]


def _untile_taps(taps: Sequence[Array], axis: int, dilation: int, tiles: int) -> Array:
    """The transpose of :func:`_tile_taps`: every tile's four taps added back where they were read,
    ``axis`` (tiles, dilation) → ``(2·tiles + 2)·dilation``. Tap t of tile a sits at 2a + t, so
    even positions 2b collect taps 0 (a = b) and 2 (a = b − 1), odd ones taps 1 and 3."""
    def padded(tap: Array, before: int) -> Array:
        pads = [(0, 0)] * tap.ndim
        pads[axis] = (before, 1 - before)
        return jnp.pad(tap, pads)

    even = padded(taps[0], 0) + padded(taps[2], 1)
    odd = padded(taps[1], 0) + padded(taps[3], 1)
    pairs = jnp.stack([even, odd], axis=axis + 1)                   # (tiles + 1, 2, dilation)
    shape = pairs.shape
    length = (OUTPUTS * tiles + TILE - OUTPUTS) * dilation
    return pairs.reshape(*shape[:axis], length, *shape[axis + 3:])


class _Tiling:
    """The tile grid of one convolution: output size, tiles per axis, and the padding that makes
    each axis ``(2·tiles + 2)·d`` long (the extra outputs read zeros and are cut)."""

    def __init__(self, x_shape: tuple[int, ...], padding, dilation):
        self.n, self.h, self.w, _ = x_shape
        self.dilation = tuple(dilation)
        (top, bottom), (left, right) = padding
        dh, dw = self.dilation
        self.out = (self.h + top + bottom - 2 * dh, self.w + left + right - 2 * dw)
        self.tiles = (-(-self.out[0] // (OUTPUTS * dh)), -(-self.out[1] // (OUTPUTS * dw)))
        self.pads = ((top, (OUTPUTS * self.tiles[0] + 2) * dh - self.h - top),
                     (left, (OUTPUTS * self.tiles[1] + 2) * dw - self.w - left))

    def input_tiles(self, x: Array) -> Array:
        """``Bᵀ d B`` of every tile: (N, H, W, C) → (16, N, tiles, C)."""
        x = jnp.pad(x, ((0, 0), *self.pads, (0, 0)))
        (dh, dw), (rows, cols) = self.dilation, self.tiles
        transformed = []
        for row_part in _combine(_tile_taps(x, 1, dh, rows), INPUT_TRANSFORM):
            transformed += _combine(_tile_taps(row_part, 3, dw, cols), INPUT_TRANSFORM)
        # The batch stays its own axis, so a batch sharding carries through.
        return jnp.stack(transformed).reshape(TILE * TILE, self.n, -1, x.shape[3])

    def input_tiles_transpose(self, d_tiles: Array) -> Array:
        """The transpose of :meth:`input_tiles`: (16, N, tiles, C) → (N, H, W, C)."""
        (dh, dw), (rows, cols) = self.dilation, self.tiles
        d_tiles = d_tiles.reshape(TILE, TILE, self.n, rows, dh, cols, dw, -1)
        row_parts = []
        for i in range(TILE):
            col_taps = _combine([d_tiles[i, j] for j in range(TILE)], INPUT_TRANSFORM.T)
            row_parts.append(_untile_taps(col_taps, 3, dw, cols))
        padded = _untile_taps(_combine(row_parts, INPUT_TRANSFORM.T), 1, dh, rows)
        (top, _), (left, _) = self.pads
        return padded[:, top:top + self.h, left:left + self.w]

    def output(self, products: Array) -> Array:
        """``Aᵀ M A`` of every tile, cut to the output: (16, N, tiles, C) → (N, H', W', C)."""
        (dh, dw), (rows, cols) = self.dilation, self.tiles
        m = products.reshape(TILE, TILE, self.n, rows, dh, cols, dw, -1)
        out_rows = _combine([m[a] for a in range(TILE)], OUTPUT_TRANSFORM)
        y = jnp.stack([jnp.stack(_combine([part[b] for b in range(TILE)], OUTPUT_TRANSFORM), axis=4)
                       for part in out_rows], axis=2)                  # (N, A, 2, d, B, 2, d, C)
        y = y.reshape(self.n, OUTPUTS * rows * dh, OUTPUTS * cols * dw, -1)
        return y[:, :self.out[0], :self.out[1]]

    def output_transpose(self, cotangent: Array) -> Array:
        """The transpose of :meth:`output`: (N, H', W', C) → (16, N, tiles, C)."""
        (dh, dw), (rows, cols) = self.dilation, self.tiles
        g = jnp.pad(cotangent, ((0, 0), (0, OUTPUTS * rows * dh - self.out[0]),
                                (0, OUTPUTS * cols * dw - self.out[1]), (0, 0)))
        g = g.reshape(self.n, rows, OUTPUTS, dh, cols, OUTPUTS, dw, -1)
        col_parts = [_combine([g[:, :, i, :, :, j] for j in range(OUTPUTS)], OUTPUT_TRANSFORM.T)
                     for i in range(OUTPUTS)]
        per_column = [_combine([col_parts[i][b] for i in range(OUTPUTS)], OUTPUT_TRANSFORM.T)
                      for b in range(TILE)]
        d_products = jnp.stack([jnp.stack([per_column[b][a] for b in range(TILE)])
                                for a in range(TILE)])
        return d_products.reshape(TILE * TILE, self.n, -1, cotangent.shape[3])


def _kernel_tiles(kernel: Array) -> Array:
    """``G g Gᵀ`` per channel pair: (3, 3, C_in, C_out) → (16, C_in, C_out)."""
    g = jnp.asarray(KERNEL_TRANSFORM, kernel.dtype)
    return jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(TILE * TILE, *kernel.shape[2:])


def winograd_convolution(x: Array, kernel: Array, padding: tuple[tuple[int, int], tuple[int, int]],
                         dilation: tuple[int, int]) -> Array:
    """A stride-1, ungrouped 3×3 convolution by F(2×2, 3×3), products accumulated in float32.

    Args:
      x: (N, H, W, C_in).
      kernel: (3, 3, C_in, C_out).
      padding: per spatial axis (low, high), both ≥ 0.
      dilation: per spatial axis.
    Returns:
      (N, H', W', C_out), ``H' = H + low + high − 2·d``, in x's dtype.
    """
    tiling = _Tiling(x.shape, padding, dilation)
    products = jnp.einsum("knpc,kco->knpo", tiling.input_tiles(x), _kernel_tiles(kernel),
                          preferred_element_type=jnp.float32)
    return tiling.output(products).astype(x.dtype)


def winograd_gradients(x: Array, kernel: Array, cotangent: Array,
                       padding: tuple[tuple[int, int], tuple[int, int]], dilation: tuple[int, int]
                       ) -> tuple[Array, Array]:
    """(dx, dK) of :func:`winograd_convolution` for the output cotangent (N, H', W', C_out); the
    input's tiles are formed again from x, not kept from the forward pass."""
    tiling = _Tiling(x.shape, padding, dilation)
    # The input's tiles are formed again from x tied to the cotangent, and the kernel's from its
    # transpose: XLA would take the same computations for the forward pass's and keep those tiles
    # (4× the input, 16/9× the kernel) alive in between.
    x = after(x, cotangent[:, :1, :1, :1])
    d_products = tiling.output_transpose(cotangent.astype(jnp.float32))
    d_tiles = jnp.einsum("knpo,koc->knpc", d_products, _kernel_tiles(kernel.transpose(0, 1, 3, 2)),
                         preferred_element_type=jnp.float32)
    d_kernel_tiles = jnp.einsum("knpc,knpo->kco", tiling.input_tiles(x), d_products,
                                preferred_element_type=jnp.float32)
    g = jnp.asarray(KERNEL_TRANSFORM, jnp.float32)
    d_kernel_tiles = d_kernel_tiles.reshape(TILE, TILE, *kernel.shape[2:])
    d_kernel = jnp.einsum("ai,abco,bj->ijco", g, d_kernel_tiles, g)
    # dx tied to dK: else the scheduler delays the kernel's products to the end of the backward
    # pass, where the optimiser reads dK, and keeps every layer's tiles alive until then.
    dx = after(tiling.input_tiles_transpose(d_tiles), d_kernel[:1, :1, :1, :1])
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)
