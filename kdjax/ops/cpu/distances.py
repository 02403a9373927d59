"""The CPU forms of the pairwise L1 distances and their gradient (:mod:`kdjax.ops.distances`
chooses them on the CPU): loops over blocks of 16 channels, or of 16 columns, each block an
unrolled element-wise sum.

The plain forms reduce the (..., K, L, D) element-wise differences along D, or along L for the
gradient. XLA's CPU backend writes such a tensor out before reducing it (the reduction runs in a
library that takes no fused producer). Here every step of a loop adds a block's terms, as one
element-wise expression, to an accumulator of the result's shape: the distances (..., K, L),
vectorised along L, add 16 channels a step; the gradient (..., K, D), vectorised along D, adds 16
columns of ``b`` a step. Nothing larger than the result and the weights is formed, and the
accumulator stays in cache (the measurements: benchmarks/NOTES.md, item 53).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Channels, or columns, per step of a loop: 16 was faster than 8 and as fast as 32 (NOTES item 53).
_BLOCK = 16


def _padded(x: Array, axis: int, multiple: int) -> Array:
    """``x`` with zeros appended along ``axis`` up to a multiple of ``multiple``."""
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _signed(weight: Array, difference: Array) -> Array:
    """``weight · sign(difference)`` as two selects, which ran faster than the product."""
    return jnp.where(difference > 0, weight, jnp.where(difference < 0, -weight, 0.0))


def l1_distances(a: Array, b: Array) -> Array:
    """:func:`kdjax.ops.distances.l1_distances`, float32 a (..., K, D) and b (..., D, L) →
    (..., K, L), 16 channels a step (zero channels pad D: they add 0). A channel's L entries are
    contiguous in ``b``: the axis the sum is vectorised along."""
    block = min(_BLOCK, a.shape[-1])
    a, b = _padded(a, -1, block), _padded(b, -2, block)

    def add_block(step: Array, total: Array) -> Array:
        a_block = jax.lax.dynamic_slice_in_dim(a, step * block, block, axis=-1)
        b_block = jax.lax.dynamic_slice_in_dim(b, step * block, block, axis=-2)
        return total + sum(jnp.abs(a_block[..., :, None, c] - b_block[..., None, c, :])
                           for c in range(block))

    total = jnp.zeros(a.shape[:-1] + b.shape[-1:], a.dtype)
    return jax.lax.fori_loop(0, a.shape[-1] // block, add_block, total)


def l1_distance_gradient(weight: Array, a: Array, b: Array) -> Array:
    """:func:`kdjax.ops.distances.l1_distance_gradient`, float32 weight (..., K, L), a (..., K, D)
    and b (..., D, L) → (..., K, D), 16 columns ``b_j`` a step (zero weights pad L: they add 0)."""
    block = min(_BLOCK, b.shape[-1])
    weight = _padded(weight, -1, block)
    # (..., L, D): a column's D entries contiguous, the axis the sum is vectorised along. The
    # loop reads it, so it is written out once, not fused into the sum's reads.
    b_rows = jnp.swapaxes(_padded(b, -1, block), -1, -2)

    def add_block(step: Array, total: Array) -> Array:
        w_block = jax.lax.dynamic_slice_in_dim(weight, step * block, block, axis=-1)
        b_block = jax.lax.dynamic_slice_in_dim(b_rows, step * block, block, axis=-2)
        # The block's terms summed, then added to the total: a sum that starts from the total
        # was slower.
        return total + sum(_signed(w_block[..., :, j, None], a - b_block[..., j, None, :])
                           for j in range(block))

    return jax.lax.fori_loop(0, b_rows.shape[-2] // block, add_block, jnp.zeros_like(a))
