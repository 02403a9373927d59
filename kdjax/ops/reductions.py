"""The losses' reductions in the form their platform runs fastest: on the CPU the forms of
:mod:`kdjax.ops.cpu.reductions`, elsewhere (and in forward mode alike) the plain ``jnp`` ones.
Both give the same values and derivatives (tests/ops/test_reductions.py); the CPU forms save
passes over the data where XLA's CPU backend hands each sum to a library that cannot fuse its
producer (benchmarks/NOTES.md item 52)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.ops import kernels
from kdjax.ops.cpu import reductions as cpu

Array = jax.Array


def normalize_axis(operands: tuple[Array, ...], axis: int) -> int:
    """``axis`` in [0, ndim), after checking that the operands agree in shape and dtype.

    Raises:
      ValueError: the operands differ, or ``axis`` is out of range.
    """
    first = operands[0]
    for other in operands[1:]:
        if other.shape != first.shape or other.dtype != first.dtype:
            raise ValueError(
                "operands of one reduction must share shape and dtype, got "
                f"{[(o.shape, str(o.dtype)) for o in operands]}.")
    ndim = first.ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for arrays of rank {ndim}.")
    return axis % ndim


def sums(*operands: Array, axis: int) -> tuple[Array, ...]:
    """``tuple(jnp.sum(x, axis) for x in operands)``.

    Args:
      operands: arrays of one shape and dtype (usually float32 element-wise expressions).
      axis: the axis to sum over (removed from the results).
    Returns:
      one array per operand, the operands' shape without ``axis``.
    """
    axis = normalize_axis(operands, axis)
    if kernels.cpu_forms():
        return cpu.sums(*operands, axis=axis)
    return tuple(jnp.sum(x, axis=axis) for x in operands)


def mean_squared_difference(student: Array, teacher: Array, valid: Array | None) -> Array:
    """``Σ_valid (s − t)² / max(count_valid, 1)``, over every element where ``valid`` is None.

    A masked element leaves the value and the gradient even where it is NaN or infinite.

    Args:
      student, teacher: float32 (N, H, W, C).
      valid: bool (N, H, W, 1), or None.
    Returns:
      float32 scalar.
    """
    if kernels.cpu_forms():
        return cpu.mean_squared_difference(student, teacher, valid)
    if valid is None:
        return jnp.mean(jnp.square(student - teacher))
    squares = jnp.square(jnp.where(valid, student - teacher, 0.0))
    count = jnp.sum(valid, dtype=jnp.float32) * student.shape[-1]
    return jnp.sum(squares) / jnp.maximum(count, 1.0)
