"""Pairwise L1 distances between two sets of vectors, and the gradient of a weighted sum of them,
in the form their platform runs fastest: on the CPU the forms of :mod:`kdjax.ops.cpu.distances`,
elsewhere the plain ``jnp`` ones, which broadcast the element-wise differences into a reduction
that an accelerator's fusion never writes out. Both give the same values (tests/ops/
test_distances.py); the CPU forms never form the differences (benchmarks/NOTES.md, item 53).

The operands are laid out as a matrix product's, ``a`` (..., K, D) and ``b`` (..., D, L): the
distances are the L1 analogue of ``a @ b``, with ``b``'s columns as its vectors. The CPU form of
the distances reads each channel's L entries contiguously; a transposed copy made inside its
loop would be fused into the sum's reads and read with a stride of D, several times slower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.ops import kernels
from kdjax.ops.cpu import distances as cpu

Array = jax.Array


def _check(a: Array, b: Array, weight: Array | None = None) -> None:
    """Raises ValueError unless ``a`` (..., K, D) and ``b`` (..., D, L) share their leading axes
    and D, and ``weight``, if given, is (..., K, L)."""
    if a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"the vectors must be (..., K, D) and (..., D, L) with the same leading "
                         f"axes and D, got {a.shape} and {b.shape}.")
    if weight is not None and weight.shape != a.shape[:-1] + b.shape[-1:]:
        raise ValueError(f"the weights must be (..., K, L) = {a.shape[:-1] + b.shape[-1:]}, got "
                         f"{weight.shape}.")


def _differences(a: Array, b: Array) -> Array:
    """(..., K, L, D): ``a_ic − b_cj``."""
    return a[..., :, None, :] - jnp.swapaxes(b, -1, -2)[..., None, :, :]


def l1_distances(a: Array, b: Array) -> Array:
    """``d_ij = Σ_c |a_ic − b_cj|``: every row of ``a`` against every column of ``b``.

    Args:
      a: float32 (..., K, D).
      b: float32 (..., D, L), the same leading axes.
    Returns:
      float32 (..., K, L).
    """
    _check(a, b)
    if kernels.cpu_forms():
        return cpu.l1_distances(a, b)
    return jnp.sum(jnp.abs(_differences(a, b)), axis=-1)


def l1_distance_gradient(weight: Array, a: Array, b: Array) -> Array:
    """``Σ_j w_ij sign(a_ic − b_cj)``: the gradient of ``Σ_ij w_ij d_ij`` w.r.t. ``a``, for the
    distances of :func:`l1_distances` and constant weights (sign 0 at 0, as ``torch.cdist``).

    Args:
      weight: float32 (..., K, L).
      a: float32 (..., K, D).
      b: float32 (..., D, L).
    Returns:
      float32 (..., K, D).
    """
    _check(a, b, weight)
    if kernels.cpu_forms():
        return cpu.l1_distance_gradient(weight, a, b)
    return jnp.sum(weight[..., None] * jnp.sign(_differences(a, b)), axis=-2)
